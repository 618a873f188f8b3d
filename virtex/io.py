"""Atomic file writes: a file is either complete or absent, never half-written.

A file is written to ``.<name>~<host>~<pid>.tmp`` beside it, then renamed. The writer
removes its temporary on any error (Ctrl-C included); one killed outright (``kill -9``,
the OOM killer) leaves it behind, named after its host and pid, so that
:func:`remove_stale_temporaries` can tell a dead writer's leftovers from a live one's.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from virtex.errors import UserError

_TMP = re.compile(r"^\.(?P<name>.+)~(?P<host>[^~]+)~(?P<pid>\d+)\.tmp$")


def temporary_path(path: Path) -> Path:
    """Where :func:`atomic_write` writes ``path`` before renaming it."""
    return path.parent / f".{path.name}~{socket.gethostname()}~{os.getpid()}.tmp"


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (torch wraps a failed write in a RuntimeError)."""
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through ``write(fileobj)`` into a temporary file, then rename it.

    A full disk, a read-only or missing-permission directory is one :class:`UserError`
    naming the path; the previous version of ``path``, if any, is left as it was.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in path.parents if p.exists() and not p.is_dir())
        raise UserError(f"cannot write {path}: {blocker} is not a directory") from None
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        cause = _os_error(exc)
        if isinstance(exc, (OSError, RuntimeError)) and cause is not None and cause.errno in (
                errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR):
            raise UserError(f"cannot write {path}: {os.strerror(cause.errno).lower()}") from None
        raise
    return path


def remove_stale_temporaries(directory: str | Path, other_hosts: bool = False) -> list[Path]:
    """Delete the temporaries of dead writers under ``directory``; returns what was removed.

    A temporary of this host is stale when its pid is no live process. With
    ``other_hosts`` (for a directory whose lock this process holds), temporaries of other
    hosts and unnamed ones of older releases are stale too.
    """
    removed = []
    me = socket.gethostname()
    for tmp in Path(directory).rglob(".*.tmp"):
        m = _TMP.match(tmp.name)
        if m and m["host"] == me:
            stale = not pid_alive(int(m["pid"]))
        else:
            stale = other_hosts
        if stale:
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process of this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
