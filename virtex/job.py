"""What a launcher places: one run of a spec (``virtex.experiment.prepare`` makes it)."""

from __future__ import annotations

from dataclasses import dataclass


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
