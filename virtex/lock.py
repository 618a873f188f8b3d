"""One owner per run directory: a lock file with its holder, taken over only from the dead.

``RUN_DIR/.lock`` is created exclusively (``O_CREAT | O_EXCL``, which shared filesystems
honour) and holds the holder's host, pid, SLURM job id and start time; a thread touches it
every :data:`HEARTBEAT` seconds while the run lives. A second start on a held directory is
one clear error naming the holder. A lock is stale, and taken over, when its holder is a
dead process of this host, when it belongs to this same SLURM job (a requeued job is the
same run; SLURM stops the old instance first), or when its heartbeat is older than
:data:`STALE_AFTER` seconds (a holder on another host that died without cleaning up).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from virtex.errors import UserError
from virtex.io import pid_alive

HEARTBEAT = 30.0
STALE_AFTER = 300.0
LOCK_NAME = ".lock"


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.time()}


def _stale(path: Path, holder: dict) -> bool:
    me = _me()
    if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
        return True
    if holder.get("host") == me["host"]:
        return not pid_alive(int(holder.get("pid", -1)))
    try:
        return time.time() - path.stat().st_mtime > STALE_AFTER
    except FileNotFoundError:
        return True


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _create(path: Path, holder: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(holder, f)
    return True


def acquire(run_dir: Path) -> Path:
    """Take ``run_dir``'s lock (creating the directory) or raise :class:`UserError`."""
    try:
        return _acquire(run_dir)
    except OSError as exc:  # a read-only or unwritable directory
        raise UserError(f"cannot write {exc.filename or run_dir}: "
                        f"{(exc.strerror or str(exc)).lower()}") from None


def _acquire(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    for _ in range(3):
        if _create(path, _me()):
            return path
        holder = _read(path)
        if not holder:  # being written by its creator right now, or unreadable: look again
            time.sleep(0.2)
            holder = _read(path)
        if holder and not _stale(path, holder):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
            job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
            raise UserError(f"run directory {run_dir} is in use by pid {holder.get('pid')} on "
                            f"host {holder.get('host')}{job} since {since}: wait for it to "
                            "finish, or choose another --run_dir")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead holder's lock: take it over
    raise UserError(f"run directory {run_dir}: could not take its lock {path}")


def release(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    holder, me = _read(path), _me()
    if (holder.get("pid"), holder.get("host")) == (me["pid"], me["host"]):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def hold(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``run_dir``'s lock for the block, with a heartbeat; released on exit."""
    path = acquire(Path(run_dir))
    done = threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT):
            with contextlib.suppress(OSError):
                os.utime(path)

    thread = threading.Thread(target=beat, name="virtex-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield path
    finally:
        done.set()
        release(path)
