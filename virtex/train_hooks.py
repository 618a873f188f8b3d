"""Training hooks: objects :meth:`virtex.engine.Trainer.fit` calls at documented points.

A hook has some of ``on_train_start(state)``, ``after_step(state, out)``,
``on_checkpoint(state)`` and ``on_train_end(state)`` (see :class:`Hook`); ``state`` is the
:class:`virtex.engine.TrainState`. The built-in ones: :class:`Checkpoints`,
:class:`LogProgress` and :class:`StopRequest`. A plugin adds its own through the
``virtex_train_hooks`` hook (docs/plugins.md, "Training hooks").
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtex import checkpoint, dist
from virtex.context import Context

if TYPE_CHECKING:
    from virtex.engine import TrainState


class Hook:
    """A training hook. :meth:`~virtex.engine.Trainer.fit` calls, on every rank and in the
    order of its hooks, ``on_train_start(state)`` once before the first step (after resuming),
    ``after_step(state, out)`` after every optimizer step (``state.step`` already counts
    it; ``out`` is the task's output), ``on_checkpoint(state)`` at every checkpoint step
    (the built-in :class:`Checkpoints` hook writes the file first) and
    ``on_train_end(state)`` when training reached ``max_steps``. A hook need not derive
    from this class: a missing method is not called."""

    def on_train_start(self, state: TrainState) -> None:
        pass

    def after_step(self, state: TrainState, out: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, state: TrainState) -> None:
        pass

    def on_train_end(self, state: TrainState) -> None:
        pass


class StopRequest(Hook):
    """The stop request: after :meth:`request` (from any thread, e.g. a launcher's signal
    handler), every rank ends the current step with a checkpoint and
    :meth:`~virtex.engine.Trainer.fit` raises :class:`~virtex.engine.Preempted`. Every rank
    must run it (it is a collective each step)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def request(self) -> None:
        self.event.set()

    def after_step(self, state: TrainState, out: dict[str, Any]) -> None:
        requested = dist.any_true(self.event.is_set())  # every rank stops at the same step
        state.stop = state.stop or requested


_SCOPED_HOOKS: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
    "virtex_scoped_train_hooks", default=())


@contextlib.contextmanager
def training_hooks(*hooks: Any) -> Iterator[None]:
    """Add ``hooks`` to every :meth:`~virtex.engine.Trainer.fit` run inside this block (in
    this thread), nested trainers included: how a launcher hands the trainers of a run its
    :class:`StopRequest`."""
    token = _SCOPED_HOOKS.set((*_SCOPED_HOOKS.get(), *hooks))
    try:
        yield
    finally:
        _SCOPED_HOOKS.reset(token)


def call_hooks(hooks: Sequence[Any], point: str, *args: Any) -> None:
    """Call method ``point`` of every hook that has one, in order."""
    for hook in hooks:
        method = getattr(hook, point, None)
        if method is not None:
            method(*args)


def scoped_hooks() -> tuple[Any, ...]:
    """The hooks of the enclosing :func:`training_hooks` blocks, outermost first."""
    return _SCOPED_HOOKS.get()


class LogProgress(Hook):
    """Periodic logging: losses, learning rates and images/s every ``every`` steps (and at
    the last), to the run's logs; a progress bar on rank 0 when stderr is a terminal."""

    def __init__(self, ctx: Context, max_steps: int, batch_size: int, every: int,
                 prefix: str = ""):
        self.ctx, self.max_steps, self.batch_size = ctx, max_steps, batch_size
        self.every, self.prefix, self.bar = every, prefix, None

    def on_train_start(self, state: TrainState) -> None:
        if self.ctx.rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.max_steps, initial=state.step, desc="train",
                            dynamic_ncols=True)
        self.seen, self.t0 = 0, time.perf_counter()

    def after_step(self, state: TrainState, out: dict[str, Any]) -> None:
        self.seen += self.batch_size
        if state.step % self.every == 0 or state.step == self.max_steps:
            losses = {f"loss/{k}": dist.mean(v.float()).item() for k, v in out["losses"].items()}
            total = float(state.loss.item())  # type: ignore[union-attr]
            rate = self.seen / (time.perf_counter() - self.t0)
            metrics = {"loss/total": total, **losses, "throughput/images_per_s": rate}
            for group in state.optimizer.param_groups:
                metrics[f"lr/{group['name']}"] = group["lr"]
            self.ctx.log({f"{self.prefix}{k}": v for k, v in metrics.items()}, state.step)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{total:.4f}")
            else:
                self.ctx.info(f"step {state.step}/{self.max_steps} loss {total:.4f} "
                              f"({rate:.1f} img/s)")
            self.seen, self.t0 = 0, time.perf_counter()
        if self.bar is not None:
            self.bar.update(1)

    def on_train_end(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.close()


class Checkpoints(Hook):
    """Checkpointing: writes ``state.state_dict()`` to ``directory`` (rank 0) and prunes
    the older files (see :func:`virtex.checkpoint.prune`)."""

    def __init__(self, directory: Path, rank: int, keep_last: int, keep_every: int | None):
        self.directory, self.rank = directory, rank
        self.keep_last, self.keep_every = keep_last, keep_every

    def on_checkpoint(self, state: TrainState) -> None:
        saved = state.state_dict()
        if self.rank == 0:
            checkpoint.save(saved, self.directory, state.step)
            checkpoint.prune(self.directory, self.keep_last, self.keep_every)
        dist.barrier()
