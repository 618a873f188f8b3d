"""What the runner hands to the trainer: where the run lives, its process, its logger.

Evaluators get a :class:`virtex.evaluation.api.EvalRequest` instead."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from virtex.io import write_text


class RunLogger:
    """Metrics to tensorboard, ``log.txt`` and ``metrics.jsonl``, on rank 0 only."""

    def __init__(self, run_dir: Path, rank: int = 0):
        self.run_dir = Path(run_dir)
        self.rank = rank
        self._writer = None
        self._purge_step: int | None = None

    @property
    def writer(self):  # tensorboard import is slow: only when first used
        if self._writer is None and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"),
                                         purge_step=self._purge_step)
        return self._writer

    def rewind(self, step: int) -> None:
        """Forget what was logged after ``step`` (a run resumed from its checkpoint at
        ``step`` logs the later steps again): ``metrics.jsonl`` keeps its complete rows up
        to ``step``, and tensorboard purges its later events."""
        if self.rank != 0:
            return
        self._purge_step = step + 1
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # the half-written last line of a killed run
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(line + "\n")
        write_text(path, "".join(kept))

    def info(self, message: str) -> None:
        if self.rank != 0:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
        print(line, flush=True)
        with open(self.run_dir / "log.txt", "a") as f:
            f.write(line + "\n")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.rank != 0:
            return
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), step)
        self.writer.flush()
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")

    def text(self, tag: str, text: str, step: int) -> None:
        if self.rank == 0:
            self.writer.add_text(tag, text, step)
            self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@dataclass
class Context:
    """What :meth:`virtex.engine.Trainer.fit` reads, and ``step``, the step it trained to."""

    run_dir: Path
    device: torch.device
    logger: RunLogger
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    step: int = 0

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logger.log(metrics, self.step if step is None else step)

    def info(self, message: str) -> None:
        self.logger.info(message)
