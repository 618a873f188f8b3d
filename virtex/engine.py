"""The training engine: deterministic data order, exact resume, DDP, AMP.

:meth:`Trainer.fit` is a short loop over public parts: a :class:`TrainState` (model,
optimizer, GradScaler, Lookahead, step, every RNG; one ``state_dict``), a data source
(:mod:`virtex.data.source`) and hooks (:mod:`virtex.train_hooks`) called at documented
points (logging, checkpointing, the stop request and plugins' hooks: sample captions).

Exact resume rests on two rules: the batch of step ``s`` is a function of ``(seed, s)``
(:class:`~virtex.data.source.StepBatchSampler`; a stream saves its position), and every
other source of randomness (the RNG states of every process) is saved in the checkpoint.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gin
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from virtex import checkpoint, contracts, dist
from virtex.checks import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    checked_as,
)
from virtex.context import Context
from virtex.data.source import DataSource, MapSource, StreamingDataset
from virtex.errors import UserError
from virtex.registry import get_registry
from virtex.train_hooks import Checkpoints, LogProgress, call_hooks, scoped_hooks


class Preempted(Exception):
    """Raised by :meth:`Trainer.fit` after it saved a checkpoint because a stop was requested."""


class Lookahead:
    """Lookahead (Zhang et al. 2019): every ``k`` steps pull slow weights ``alpha`` toward fast ones."""

    def __init__(self, params: list[nn.Parameter], alpha: float = 0.5, k: int = 5):
        self.params, self.alpha, self.k = params, alpha, k
        self.slow = [p.detach().clone() for p in params]
        self.counter = 0

    @torch.no_grad()
    def update(self) -> None:
        self.counter += 1
        if self.counter % self.k:
            return
        for p, s in zip(self.params, self.slow):
            s.add_(p.detach() - s, alpha=self.alpha)
            p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"counter": self.counter, "slow": self.slow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counter = int(state["counter"])
        for s, saved in zip(self.slow, state["slow"]):
            s.copy_(saved)


WARMUP_STARTS = ("zero", "one_step")
NO_DECAY_RULES = ("virtex", "norm_bias")

# The original VirTex rule, ``re.match(".*textual.(embedding|transformer).*(norm.*|bias)")``,
# written for our names: a head is ``textual`` or ``textual_backward`` (the original's
# ``backward_textual``) and its decoder layers are ``layers.N`` (``transformer.layers.N``).
_VIRTEX_NO_DECAY = re.compile(r".*textual(?:_backward)?\.(?:embedding|layers)\..*(?:norm|bias)")


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, schedule: str,
                  milestones: tuple[int, ...] = (), gamma: float = 0.1,
                  warmup_start: str = "one_step") -> float:
    """The learning-rate factor of the step that follows ``step`` optimizer steps.

    Linear warmup, then ``cosine`` (``cos²(π/2 · progress)``, which equals
    ``0.5 · (1 + cos(π · progress))`` but keeps full relative precision near the end),
    ``multistep`` (``gamma`` to the number of ``milestones`` <= ``step``) or ``constant``.
    Warmup: ``warmup_start='zero'`` is the original VirTex's ``step / warmup_steps`` (its
    scheduler steps after each iteration, so the first iteration runs with learning rate
    0); ``'one_step'`` is ``(step + 1) / warmup_steps`` (the first step already trains).
    """
    if warmup_start not in WARMUP_STARTS:
        raise UserError(f"trainer.warmup_start: unknown {warmup_start!r}, expected 'zero' "
                        "(the original VirTex: the first step at learning rate 0) or "
                        "'one_step' (step k at (k+1)/warmup_steps)")
    if warmup_steps and step < warmup_steps:
        return (step + (warmup_start == "one_step")) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return math.cos(0.5 * math.pi * min(1.0, progress)) ** 2
    if schedule == "multistep":
        return gamma ** sum(step >= m for m in milestones)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"trainer.schedule: unknown '{schedule}', expected cosine, multistep or constant")


def no_weight_decay(name: str, param: nn.Parameter, rule: str = "virtex") -> bool:
    """Whether parameter ``name`` (a ``model.named_parameters()`` name) is kept out of
    weight decay.

    ``'virtex'``: the original VirTex rule, only the textual heads' embedding LayerNorm and
    their decoder layers' biases and LayerNorms (CNN BatchNorms, the visual projection,
    word/position embeddings and the output layer are decayed; a model without a textual
    head, e.g. iNaturalist fine-tuning, decays everything). ``'norm_bias'``: every
    parameter with at most one dimension (norms and biases everywhere).
    """
    if rule == "virtex":
        return _VIRTEX_NO_DECAY.match(name) is not None
    if rule == "norm_bias":
        return param.ndim <= 1
    raise _unknown_no_decay(rule)


def _unknown_no_decay(rule: str) -> UserError:
    return UserError(f"trainer.no_decay: unknown {rule!r}, expected 'virtex' (the original "
                     "VirTex rule: textual-head norms and biases only) or 'norm_bias' (every "
                     "norm and bias)")


def param_groups(model: nn.Module, lr: float, backbone_lr: float | None,
                 weight_decay: float, no_decay: str = "norm_bias") -> list[dict[str, Any]]:
    """Backbone (``model.visual``) vs. rest (separate learning rates), each split into
    decayed and not decayed parameters by the rule ``no_decay`` (see
    :func:`no_weight_decay`). Shared and tied tensors appear once."""
    visual = getattr(model, "visual", None)
    visual_ids = {id(p) for p in visual.parameters()} if visual is not None else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (id(p) in visual_ids and backbone_lr is not None,
                   no_weight_decay(name, p, no_decay))
            groups.setdefault(key, []).append(p)
    out = []
    for (is_visual, no_decay_group), params in sorted(groups.items()):
        out.append({
            "params": params,
            "lr": backbone_lr if is_visual else lr,
            "weight_decay": 0.0 if no_decay_group else weight_decay,
            "name": ("backbone" if is_visual else "head") + ("_no_decay" if no_decay_group else ""),
        })
    return out


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(int(x) for x in state["python"]), state["python_pos"]))


def _global_mean(loss: torch.Tensor, weight: torch.Tensor | None,
                 world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the global-batch loss to report, the loss to back-propagate on this rank).

    A task may return ``weight``: how many terms its mean is over (e.g. caption
    tokens). Scaling by ``weight * world_size / total`` makes DDP's gradient average
    equal the gradient of the mean over the global batch, as in one process.
    """
    if world_size <= 1:
        return loss.detach().float(), loss
    if weight is None:
        return dist.mean(loss.detach().float()), loss
    w = torch.as_tensor(weight, dtype=torch.float32, device=loss.device).detach()
    stats = torch.stack([loss.detach().float() * w, w])
    torch.distributed.all_reduce(stats)
    total = stats[1].clamp_min(1e-12)
    return stats[0] / total, loss * (w * world_size / total)


def _to_device(batch: Any, device: torch.device, channels_last: bool) -> Any:
    if isinstance(batch, dict):
        return {k: _to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


@dataclass(eq=False)
class TrainState:
    """Everything a checkpoint holds: model, optimizer, GradScaler, Lookahead, step, the
    RNGs of every rank and, for a data source with ``state_dict``, its position.

    :meth:`state_dict` is a collective (every rank gathers its RNG states, and its data
    position, to all); the result is the checkpoint rank 0 writes.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lookahead: Lookahead | None = None
    data: Any = None  # the data source: its position is saved if it has ``state_dict``
    step: int = 0
    rank: int = 0
    stop: bool = False  # a stop was requested: checkpoint at this step, then Preempted
    loss: torch.Tensor | None = None  # the global-batch loss of the last step
    output_checked: bool = False  # the task's first output fit the contract
    base_lrs: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "lookahead": self.lookahead.state_dict() if self.lookahead is not None else {},
            "step": self.step,
            "rng": dist.gather_objects(_rng_state()),
        }
        if hasattr(self.data, "state_dict"):
            state["data"] = dist.gather_objects(self.data.state_dict())
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is not None:  # what a loader checks its vocabulary against
            state["vocab"] = tokenizer.describe()
        return state

    def load_state_dict(self, state: dict[str, Any], where: str = "checkpoint") -> None:
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is not None and "vocab" in state:
            tokenizer.check_fits(state["vocab"], where)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.lookahead is not None and state.get("lookahead"):
            self.lookahead.load_state_dict(state["lookahead"])
        self.step = int(state["step"])
        _set_rng_state(_mine(state["rng"], self.rank))
        if "data" in state and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(_mine(state["data"], self.rank))


def _mine(per_rank: list[Any], rank: int) -> Any:
    return per_rank[rank] if rank < len(per_rank) else per_rank[0]


@gin.configurable("trainer")
@checked_as("trainer")
class Trainer:
    """Pretrains a task model; checkpoints are written to ``run_dir/checkpoints``.

    ``dataset``: a map-style dataset (trained through :class:`MapSource`) or a
    :class:`~virtex.data.source.DataSource` whose ``batch_size`` equals ``batch_size``.
    ``log_prefix`` prefixes the logged names (for trainers run inside evaluators).
    With ``sample_dataset`` (e.g. COCO val2017 with the eval transform), a captioning
    model captions its first ``num_samples`` images at every checkpoint, to tensorboard
    (the captioning plugin's ``train_hooks.sample_captions``).
    On CPU the training process uses ``cpu_threads`` threads (default: the cores
    left over by the ``num_workers`` loader processes, at least one).
    ``hooks``: more training hooks (see :class:`virtex.train_hooks.Hook`), after the built-in ones.

    ``no_decay`` chooses the parameters without weight decay (:func:`no_weight_decay`:
    ``'virtex'``, the original's rule, or ``'norm_bias'``); ``warmup_start`` the first
    warmup value (:func:`lr_multiplier`: ``'zero'``, the original's, or ``'one_step'``).
    ``amp='fp16'`` (autocast + gradient scaling, as the original on GPUs) only acts on
    CUDA devices: on CPU the run stays float32, because fp16 autocast on CPU would change
    the numerics the original never ran with. ``amp='bf16'`` autocasts on any device.
    """

    def __init__(
        self,
        dataset: Dataset | DataSource = gin.REQUIRED,
        batch_size: PositiveInt = 256,
        max_steps: PositiveInt = 500_000,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: NonNegativeFloat = 0.001,
        backbone_lr: NonNegativeFloat | None = 0.2,
        momentum: NonNegativeFloat = 0.9,
        nesterov: bool = False,
        weight_decay: NonNegativeFloat = 1e-4,
        no_decay: str = "norm_bias",
        warmup_steps: NonNegativeInt = 10_000,
        warmup_start: str = "one_step",
        schedule: str = "cosine",
        milestones: tuple[int, ...] = (),
        gamma: PositiveFloat = 0.1,
        lookahead: bool = True,
        lookahead_alpha: Probability = 0.5,
        lookahead_k: PositiveInt = 5,
        clip_grad_norm: PositiveFloat | None = 10.0,
        amp: Literal["fp16", "bf16"] | None = None,
        channels_last: bool = False,
        compile: bool = False,
        fused: bool = True,
        num_workers: NonNegativeInt = 4,
        cpu_threads: PositiveInt | None = None,
        checkpoint_every: PositiveInt = 2000,
        keep_last: PositiveInt = 3,
        keep_every: PositiveInt | None = None,
        log_every: PositiveInt = 20,
        log_prefix: str = "",
        sample_dataset: Dataset | None = None,
        num_samples: NonNegativeInt = 4,
        hooks: Sequence[Any] = (),
    ):
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"trainer.optimizer: unknown '{optimizer}', expected sgd or adamw")
        if amp not in (None, "fp16", "bf16"):
            raise ValueError(f"trainer.amp: unknown '{amp}', expected None, 'fp16' or 'bf16'")
        if no_decay not in NO_DECAY_RULES:
            raise _unknown_no_decay(no_decay)
        lr_multiplier(0, warmup_steps, max_steps, schedule, tuple(milestones), gamma,
                      warmup_start)
        self.__dict__.update({k: v for k, v in locals().items() if k != "self"})
        self.milestones, self.hooks = tuple(milestones), list(hooks)

    def lr_multiplier(self, step: int) -> float:
        """The learning-rate factor of the step after ``step`` optimizer steps (the
        learning rate of group ``g`` is its base learning rate times this)."""
        return lr_multiplier(step, self.warmup_steps, self.max_steps, self.schedule,
                             self.milestones, self.gamma, self.warmup_start)

    def amp_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype on ``device``: None (float32) for fp16 on a non-CUDA device."""
        if self.amp == "fp16" and device.type != "cuda":
            return None
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.amp or "")

    # -- the named parts of fit -------------------------------------------------------
    def _optimizer(self, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
        groups = param_groups(model, self.lr, self.backbone_lr, self.weight_decay,
                              self.no_decay)
        fused = bool(self.fused and device.type == "cuda")
        if self.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum,
                                   nesterov=self.nesterov, fused=fused or None)
        return torch.optim.AdamW(groups, lr=self.lr, fused=fused or None)

    def source(self, ctx: Context) -> DataSource:
        """The data source: ``dataset`` itself if it is one, the one a streaming dataset
        makes (:class:`~virtex.data.source.StreamingDataset`), else a :class:`MapSource`."""
        if self.batch_size % ctx.world_size:
            raise UserError(f"trainer.batch_size = {self.batch_size} is not divisible by the "
                            f"{ctx.world_size} processes of this run (--gpus x --nodes)")
        if isinstance(self.dataset, StreamingDataset):
            return self.dataset.as_source(self.batch_size, self.num_workers)
        if not isinstance(self.dataset, DataSource):
            return MapSource(self.dataset, self.batch_size, self.max_steps, self.num_workers,
                             pin_memory=ctx.device.type == "cuda")
        if self.dataset.batch_size != self.batch_size:
            raise UserError(f"trainer.batch_size = {self.batch_size}, but the data source "
                            f"{type(self.dataset).__name__} yields global batches of "
                            f"{self.dataset.batch_size}: bind both to the same value")
        return self.dataset

    def state(self, model: nn.Module, ctx: Context, source: Any = None) -> TrainState:
        """A fresh train state: ``model`` on ``ctx.device``, its optimizer, scaler, Lookahead."""
        if ctx.device.type == "cpu":  # loader workers take cores too: do not oversubscribe
            cores = (os.cpu_count() or 1) // max(1, ctx.world_size)
            torch.set_num_threads(self.cpu_threads or max(1, cores - self.num_workers))
        model.to(ctx.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        # one starting point on every rank before anything copies the weights (Lookahead's
        # slow weights; DDP would only broadcast them later, at wrap)
        dist.broadcast_module(model)
        optimizer = self._optimizer(model, ctx.device)
        lookahead = Lookahead([p for g in optimizer.param_groups for p in g["params"]],
                              self.lookahead_alpha, self.lookahead_k) if self.lookahead else None
        fp16 = self.amp_dtype(ctx.device) == torch.float16
        return TrainState(model, optimizer, torch.amp.GradScaler(ctx.device.type, enabled=fp16),
                          lookahead, source, rank=ctx.rank)

    def resume(self, state: TrainState, ckpt_dir: Path, ctx: Context) -> None:
        """Load the newest checkpoint of ``ckpt_dir`` into ``state`` (if there is one)."""
        latest = checkpoint.load_latest(ckpt_dir, map_location=ctx.device)
        if latest is not None:
            path, saved = latest
            state.load_state_dict(saved, f"checkpoint '{path}'")
            ctx.info(f"resumed from {path} at step {state.step}")
        ctx.logger.rewind(state.step)  # a run killed before its first checkpoint starts over
        ctx.step = state.step

    def default_hooks(self, ctx: Context, ckpt_dir: Path) -> list[Any]:
        """Checkpointing, logging, the hooks in scope
        (:func:`~virtex.train_hooks.training_hooks`, e.g. a
        :class:`~virtex.train_hooks.StopRequest`), then the hook of every registered
        ``train_hooks`` factory (called as ``factory(trainer, ctx)``; None: no hook for this
        trainer)."""
        hooks = [Checkpoints(ckpt_dir, ctx.rank, self.keep_last, self.keep_every),
                 LogProgress(ctx, self.max_steps, self.batch_size, self.log_every,
                             self.log_prefix),
                 *scoped_hooks()]
        for component in get_registry().components("train_hooks"):
            hook = component.factory(self, ctx)
            if hook is not None:
                hooks.append(hook)
        return hooks

    def wrap(self, model: nn.Module, ctx: Context) -> nn.Module:
        """The module that runs the forward pass: DDP with several processes, compiled."""
        if ctx.world_size > 1:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return torch.compile(model) if self.compile else model  # type: ignore[return-value]

    def train_step(self, state: TrainState, train_model: nn.Module, batch: Any,
                   ctx: Context) -> dict[str, Any]:
        """One optimizer step on ``batch``; returns the task's output."""
        mult = self.lr_multiplier(state.step)
        for group, base in zip(state.optimizer.param_groups, state.base_lrs):
            group["lr"] = base * mult
        batch = _to_device(batch, ctx.device, self.channels_last)
        dtype = self.amp_dtype(ctx.device)
        with torch.autocast(ctx.device.type, dtype=dtype or torch.float32,
                            enabled=dtype is not None):
            out = train_model(batch)
        if not state.output_checked:  # what the task returns is known only now: checked once
            contracts.check_task_output(out, contracts.label_of(
                state.model, f"the model being trained ({type(state.model).__name__})"))
            state.output_checked = True
        state.loss, scaled = _global_mean(out["loss"], out.get("weight"), ctx.world_size)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(scaled).backward()
        if self.clip_grad_norm:
            state.scaler.unscale_(state.optimizer)
            nn.utils.clip_grad_norm_(state.model.parameters(), self.clip_grad_norm)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        if state.lookahead is not None:
            state.lookahead.update()
        state.step += 1
        ctx.step = state.step
        return out

    # -- the loop ---------------------------------------------------------------------
    def fit(self, model: nn.Module, ctx: Context, ckpt_dir: Path | None = None,
            hooks: Sequence[Any] = ()) -> nn.Module:
        """Train ``model`` to ``max_steps``, resuming from the newest checkpoint in
        ``ckpt_dir`` (default ``run_dir/checkpoints``) if there is one. Hooks: the
        :meth:`default_hooks`, the trainer's ``hooks``, then ``hooks``."""
        ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else ctx.run_dir / "checkpoints"
        source = self.source(ctx)
        state = self.state(model, ctx, source)
        self.resume(state, ckpt_dir, ctx)
        if state.step >= self.max_steps:
            ctx.info(f"training already finished ({state.step} steps)")
            return model
        hooks = [*self.default_hooks(ctx, ckpt_dir), *self.hooks, *hooks]
        train_model = self.wrap(model, ctx)
        call_hooks(hooks, "on_train_start", state)
        model.train()
        for batch in source.batches(ctx.seed, state.step, ctx.rank, ctx.world_size):
            out = self.train_step(state, train_model, batch, ctx)
            call_hooks(hooks, "after_step", state, out)
            if (state.step % self.checkpoint_every == 0 or state.step == self.max_steps
                    or state.stop):
                call_hooks(hooks, "on_checkpoint", state)
            if state.stop and state.step < self.max_steps:
                ctx.info(f"stop requested: checkpoint saved at step {state.step}")
                raise Preempted(state.step)
            if state.step >= self.max_steps:
                break
        call_hooks(hooks, "on_train_end", state)
        return model
