"""torch.distributed helpers: one process per GPU (or per CPU worker with gloo)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def init(rank: int, world_size: int, master_addr: str, master_port: int, backend: str) -> None:
    """Initialise the default process group (no-op for a single process)."""
    if world_size <= 1 or is_initialized():
        return
    os.environ["MASTER_ADDR"] = master_addr
    os.environ["MASTER_PORT"] = str(master_port)
    dist.init_process_group(backend, rank=rank, world_size=world_size)


def shutdown() -> None:
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def mean(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over processes (a copy; the input is unchanged)."""
    value = value.detach().clone()
    if is_initialized():
        dist.all_reduce(value)
        value /= world_size()
    return value


def any_true(flag: bool) -> bool:
    """Whether ``flag`` is true on any process."""
    if not is_initialized():
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: Any) -> list[Any]:
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Give every process rank ``src``'s parameters and buffers (in place)."""
    if not is_initialized() or world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src)
