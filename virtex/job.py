"""What a launcher places: one run of a spec (``virtex.experiment.prepare`` makes it)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from virtex.errors import UserError


@dataclass
class Job:
    """Everything a process needs to run a spec; picklable for spawn and SLURM."""

    spec: str
    spec_name: str
    params: list[str]
    run_dir: str
    gpus: int | None = None
    nodes: int = 1
    seed: int = 0
    command: str = ""


_LONGER = re.compile(r"^[\w./]*max_steps = ")


def check_config(job: Job, config: str) -> None:
    """A run directory holds one config: resuming it with another is one error that shows
    the differing bindings and says how to start fresh. Only how long it trains
    (``*.max_steps``) may change: a resumed run with more steps trains on."""
    saved = Path(job.run_dir) / "config.gin"
    if not saved.is_file():
        return
    before, now = saved.read_text().splitlines(), config.splitlines()
    old = [line for line in before if line not in now and line.strip()
           and not _LONGER.match(line)]
    new = [line for line in now if line not in before and line.strip()
           and not _LONGER.match(line)]
    if not old and not new:
        return
    shown = "; ".join([*(f"was `{x}`" for x in old[:3]), *(f"now `{x}`" for x in new[:3])])
    more = len(old) + len(new) - min(3, len(old)) - min(3, len(new))
    raise UserError(f"run directory {job.run_dir} holds a run of another config ({shown}"
                    f"{f'; {more} more' if more else ''}): run it with the bindings in "
                    f"{saved}, or start fresh with another --run_dir (or delete that directory)")
