"""The evaluation API: what an evaluator is given, what it returns, and its helpers.

An evaluator is a callable ``evaluator(request: EvalRequest) -> EvalResult``. The runner
builds one immutable :class:`EvalRequest` per evaluation (one per checkpoint of a sweep)
and collects the :class:`EvalResult`: its metrics go to ``metrics.json`` (and, in a sweep,
to ``sweep.csv`` and tensorboard), its summary lines to ``summary.md``.

Helpers: :func:`inference` (eval mode and no gradients, restored on exit), :func:`shard`
(this process's part of a dataset) and :func:`gather` (every process's results).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, overload, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from virtex import dist
from virtex.context import Context, RunLogger

T = TypeVar("T")


@dataclass(frozen=True)
class EvalRequest:
    """What an evaluator evaluates, and where: given by the runner, never changed.

    ``backbone`` is loaded (from ``ckpt``, or trained by this run) and on ``device``;
    ``model`` is the pretraining task model when this run trained one (else None);
    ``step`` is the training step of the weights (this run's, or the step a
    ``step_NNNNNNN.pt`` checkpoint was saved at).
    """

    backbone: nn.Module
    device: torch.device
    run_dir: Path
    logger: RunLogger
    model: nn.Module | None = None
    ckpt: Path | None = None
    step: int = 0
    rank: int = 0
    world_size: int = 1
    seed: int = 0

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Metrics to tensorboard and ``metrics.jsonl`` (rank 0), at ``step`` (default: the
        request's)."""
        self.logger.log(metrics, self.step if step is None else step)

    def info(self, message: str) -> None:
        """A line to stdout and ``log.txt`` (rank 0)."""
        self.logger.info(message)

    def text(self, tag: str, text: str) -> None:
        """Text to tensorboard at the request's step (rank 0)."""
        self.logger.text(tag, text, self.step)

    def trainer_context(self) -> Context:
        """A fresh :class:`virtex.context.Context` for :meth:`virtex.engine.Trainer.fit`
        (an evaluator that trains): the trainer counts its own steps there."""
        return Context(run_dir=self.run_dir, device=self.device, logger=self.logger,
                       rank=self.rank, world_size=self.world_size, seed=self.seed,
                       step=self.step)


@dataclass
class EvalResult:
    """What an evaluator returns: ``metrics`` (name -> number, for ``metrics.json``),
    ``summary`` (markdown lines for ``summary.md``) and ``files`` (the files it wrote).
    ``EvalResult()`` is the result of an evaluator that had nothing to do."""

    metrics: dict[str, float] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


@runtime_checkable
class Evaluator(Protocol):
    """The evaluator contract: ``evaluator(request) -> EvalResult``."""

    def __call__(self, request: EvalRequest) -> EvalResult: ...


@contextlib.contextmanager
def inference(*modules: nn.Module) -> Iterator[None]:
    """``modules`` in eval mode under ``torch.no_grad()`` for the block; on exit (also
    on an error) every submodule gets back the train/eval mode it had."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for m, training in saved:
            m.training = training


@overload
def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]: ...
@overload
def shard(items: Dataset, rank: int, world_size: int) -> Subset: ...
def shard(items: Any, rank: int, world_size: int) -> Any:
    """This process's part of ``items``: the items ``rank, rank + world_size, ...`` (a list
    for a sequence, a :class:`~torch.utils.data.Subset` for a dataset). Every item goes
    to exactly one process."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    indices = range(rank, len(items), world_size)
    if isinstance(items, Sequence):
        return [items[i] for i in indices]
    return Subset(items, indices)


def gather(items: Sequence[T]) -> list[T]:
    """Every process's ``items`` concatenated in rank order (the inverse of
    :func:`shard` up to order), on every process; call it on every process."""
    return [x for part in dist.gather_objects(list(items)) for x in part]


def is_captioning_model(model: object) -> bool:
    """Whether ``model`` can caption images (a captioning task with its tokenizer)."""
    return all(hasattr(model, a) for a in ("generate", "tokenizer", "textual", "visual"))
