"""Data-loader workers and SLURM's SIGTERM to the whole job (virtex.data.loader)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from torch.utils.data import DataLoader, Dataset

from virtex.data.loader import data_loader

pytestmark = pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="needs sigwaitinfo")


class Pids(Dataset):
    """Item i: (i, the pid of the process that produced it), a little slowly."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> tuple[int, int]:
        time.sleep(0.02)
        return i, os.getpid()


def _iterate_and_signal(loader: DataLoader, send) -> list[int]:
    seen = []
    for n, (index, pid) in enumerate(loader):
        seen.append(int(index))
        if n == 2:
            send(int(pid))
            time.sleep(0.2)  # let the signal land before the prefetched batches run out
    return seen


def _foreign_kill(pid: int) -> None:
    subprocess.run(["kill", "-TERM", str(pid)], check=True)  # sender: another process


def test_workers_survive_a_sigterm_from_another_process():
    loader = data_loader(Pids(), batch_size=None, num_workers=1)
    assert _iterate_and_signal(loader, _foreign_kill) == list(range(40))


def test_plain_pytorch_workers_die_of_it():
    """What the loader protects against: without it the same signal ends the run."""
    loader = DataLoader(Pids(), batch_size=None, num_workers=1)
    with pytest.raises(RuntimeError, match="exited unexpectedly|killed by signal"):
        _iterate_and_signal(loader, _foreign_kill)


def test_the_parents_sigterm_still_ends_a_worker():
    loader = data_loader(Pids(), batch_size=None, num_workers=1)
    with pytest.raises(RuntimeError, match="exited unexpectedly|killed by signal"):
        _iterate_and_signal(loader, lambda pid: os.kill(pid, signal.SIGTERM))
