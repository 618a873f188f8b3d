"""The local launcher: this machine, one process, or one process per GPU with DDP; a plan's
steps run one after another, in order."""

from __future__ import annotations

import argparse

import torch
import torch.multiprocessing as mp

from virtex import dist
from virtex.contracts import Arguments, LaunchResult
from virtex.errors import UserError
from virtex.experiment import Job, own_run_dir, run_job
from virtex.plan import Plan, perform


def _spawned(rank: int, job: Job, world_size: int, port: int) -> None:
    run_job(job, rank=rank, world_size=world_size, local_rank=rank, master_port=port)


class LocalLauncher:
    """Runs in this process, or with ``--gpus N>1`` starts N processes (nccl on GPU, gloo on
    CPU). A plan's steps run in order; a finished one (its ``metrics.json`` written) is
    skipped, its actions after the run done again (they are idempotent)."""

    def add_arguments(self, parser: Arguments) -> None:
        """No options of its own (``--gpus`` and ``--nodes`` are the CLI's)."""

    def set_options(self, options: argparse.Namespace) -> None:
        """Nothing to take: the job carries ``--gpus`` and ``--nodes``."""

    def run(self, job: Job) -> None:
        """One run of a spec, here."""
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

    def launch(self, plan: Plan) -> LaunchResult:
        plan.record()
        for step in plan.steps:
            if plan.kind != "run":
                if step.finished():
                    print(f"virtex: {step.name}: finished already, skipped", flush=True)
                    perform(step.then)
                    continue
                print(f"virtex: {step.name}: running in {step.job.run_dir}", flush=True)
            perform(step.before)
            self.run(step.job)
            perform(step.then)
        return LaunchResult(returncode=0, finished=True, output=plan.run_dir)
