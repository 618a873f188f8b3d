"""The local launcher: this machine, one process, or one process per GPU with DDP."""

from __future__ import annotations

import argparse

import torch
import torch.multiprocessing as mp

from virtex import dist
from virtex.contracts import Arguments, LaunchResult
from virtex.errors import UserError
from virtex.experiment import Job, own_run_dir, run_job


def _spawned(rank: int, job: Job, world_size: int, port: int) -> None:
    run_job(job, rank=rank, world_size=world_size, local_rank=rank, master_port=port)


class LocalLauncher:
    """Runs in this process, or with ``--gpus N>1`` starts N processes (nccl on GPU, gloo on CPU)."""

    def add_arguments(self, parser: Arguments) -> None:
        """No options of its own (``--gpus`` and ``--nodes`` are the CLI's)."""

    def set_options(self, options: argparse.Namespace) -> None:
        """Nothing to take: the job carries ``--gpus`` and ``--nodes``."""

    def launch(self, job: Job) -> LaunchResult:
        if job.nodes != 1:
            raise UserError("the local launcher runs on one node: use --launcher slurm for --nodes > 1")
        processes = max(1, job.gpus or 1)
        if job.gpus and torch.cuda.is_available() and processes > torch.cuda.device_count():
            raise UserError(f"--gpus {processes}: only {torch.cuda.device_count()} GPU(s) visible")
        with own_run_dir(job):
            if processes == 1:
                run_job(job)
            else:
                mp.start_processes(_spawned, args=(job, processes, dist.free_port()),
                                   nprocs=processes, join=True, start_method="spawn")
        return LaunchResult(returncode=0, finished=True, output=job.run_dir)
