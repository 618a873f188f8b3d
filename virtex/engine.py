"""The training engine: deterministic data order, exact resume, DDP, AMP.

Exact resume rests on two rules: the batch of step ``s`` is a pure function of
``(seed, s)`` (see :class:`StepBatchSampler`), and every other source of
randomness (the RNG states of every process) is saved in the checkpoint.
"""

from __future__ import annotations

import math
import os
import random
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import gin
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

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
from virtex.data.loader import data_loader
from virtex.errors import UserError
from virtex.evaluation.api import inference, is_captioning_model


class Preempted(Exception):
    """Raised by :meth:`Trainer.fit` after it saved a checkpoint because a stop was requested."""


_STOP = threading.Event()


def request_stop() -> None:
    """Ask a running :meth:`Trainer.fit` to checkpoint at the next step and raise
    :class:`Preempted` (for launchers handling SLURM's pre-emption signal)."""
    _STOP.set()


class SampleSeeded(Dataset):
    """Seeds every RNG from the key before each sample, so augmentation is reproducible."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if torch.utils.data.get_worker_info() is not None:  # a worker: its RNGs are its own
            return self._seeded(index, seed)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):  # the main process keeps its RNG streams
            try:
                return self._seeded(index, seed)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def _seeded(self, index: int, seed: int) -> Any:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return self.dataset[index]


class StepBatchSampler:
    """This rank's share of the global batch of every step in ``[start_step, max_steps)``.

    Sample position ``p = step * batch + j`` falls in epoch ``p // len(dataset)``,
    whose order is a permutation seeded by ``(seed, epoch)``; the per-sample
    augmentation seed is a function of ``(seed, p)``. Nothing depends on how
    many workers load the data or on where a run was resumed.
    """

    def __init__(self, size: int, global_batch: int, rank: int, world_size: int,
                 seed: int, start_step: int, max_steps: int):
        if global_batch % world_size:
            raise ValueError(f"batch_size {global_batch} is not divisible by {world_size} processes")
        self.size, self.batch, self.rank = size, global_batch, rank
        self.local = global_batch // world_size
        self.seed, self.start_step, self.max_steps = seed, start_step, max_steps
        self._perm: tuple[int, torch.Tensor] | None = None

    def _index(self, position: int) -> int:
        epoch = position // self.size
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.size, generator=g))
        return int(self._perm[1][position % self.size])

    def _sample_seed(self, position: int) -> int:
        return (self.seed * 2_147_483_647 + position * 7919 + 12345) % (2**62)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.max_steps):
            first = step * self.batch + self.rank * self.local
            yield [(self._index(p), self._sample_seed(p)) for p in range(first, first + self.local)]

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)


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


@gin.configurable("trainer")
@checked_as("trainer")
class Trainer:
    """Pretrains a task model; checkpoints are written to ``run_dir/checkpoints``.

    ``log_prefix`` prefixes the logged names (for trainers run inside evaluators).
    With ``sample_dataset`` (e.g. COCO val2017 with the eval transform), a captioning
    model captions its first ``num_samples`` images at every checkpoint, to tensorboard.
    On CPU the training process uses ``cpu_threads`` threads (default: the cores
    left over by the ``num_workers`` loader processes, at least one).

    ``no_decay`` chooses the parameters without weight decay (:func:`no_weight_decay`:
    ``'virtex'``, the original's rule, or ``'norm_bias'``); ``warmup_start`` the first
    warmup value (:func:`lr_multiplier`: ``'zero'``, the original's, or ``'one_step'``).
    ``amp='fp16'`` (autocast + gradient scaling, as the original on GPUs) only acts on
    CUDA devices: on CPU the run stays float32, because fp16 autocast on CPU would change
    the numerics the original never ran with. ``amp='bf16'`` autocasts on any device.
    """

    def __init__(
        self,
        dataset: Dataset = gin.REQUIRED,
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
        self.milestones = tuple(milestones)

    def lr_multiplier(self, step: int) -> float:
        """The learning-rate factor of the step after ``step`` optimizer steps (the
        learning rate of group ``g`` is its base learning rate times this)."""
        return lr_multiplier(step, self.warmup_steps, self.max_steps, self.schedule,
                             self.milestones, self.gamma, self.warmup_start)

    # -- construction -----------------------------------------------------------------
    def _optimizer(self, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
        groups = param_groups(model, self.lr, self.backbone_lr, self.weight_decay,
                              self.no_decay)
        fused = bool(self.fused and device.type == "cuda")
        if self.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum,
                                   nesterov=self.nesterov, fused=fused or None)
        return torch.optim.AdamW(groups, lr=self.lr, fused=fused or None)

    def amp_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype on ``device``: None (float32) for fp16 on a non-CUDA device."""
        if self.amp == "fp16" and device.type != "cuda":
            return None
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.amp or "")

    def _sampler(self, ctx: Context, start_step: int) -> StepBatchSampler:
        """This process's batches from ``start_step`` on (subclasses may sample otherwise)."""
        return StepBatchSampler(len(self.dataset), self.batch_size, ctx.rank, ctx.world_size,
                                ctx.seed, start_step, self.max_steps)

    def _loader(self, ctx: Context, start_step: int) -> DataLoader:
        workers = self.num_workers
        return data_loader(
            SampleSeeded(self.dataset),
            batch_sampler=self._sampler(ctx, start_step),
            num_workers=workers,
            collate_fn=getattr(self.dataset, "collate_fn", None),
            pin_memory=ctx.device.type == "cuda",
            persistent_workers=False,
            # its own generator: the loader must not draw from the global RNG, whose
            # state (dropout, masking) is restored exactly on resume
            generator=torch.Generator().manual_seed(ctx.seed),
            prefetch_factor=4 if workers > 0 else None,
        )

    def _log_samples(self, model: nn.Module, ctx: Context, step: int) -> None:
        """Caption fixed images to tensorboard (beam search: no RNG is drawn)."""
        if self.sample_dataset is None or not is_captioning_model(model):
            return
        items = [SampleSeeded(self.sample_dataset)[(i, i)]
                 for i in range(min(self.num_samples, len(self.sample_dataset)))]
        images = torch.stack([item["image"] for item in items]).to(ctx.device)
        with inference(model):
            tokens = model.generate(images, method="beam", beam_size=5, decoder="paper")
        lines = [f"{int(item.get('image_id', i))}: {model.tokenizer.decode(t)}"
                 for i, (item, t) in enumerate(zip(items, tokens))]
        ctx.logger.text(f"{self.log_prefix}captions/samples", "  \n".join(lines), step)

    # -- the loop ---------------------------------------------------------------------
    def fit(self, model: nn.Module, ctx: Context, ckpt_dir: Path | None = None) -> nn.Module:
        """Train ``model`` to ``max_steps``, resuming from the newest checkpoint in
        ``ckpt_dir`` (default ``run_dir/checkpoints``) if there is one."""
        device = ctx.device
        if self.batch_size % ctx.world_size:
            raise UserError(f"trainer.batch_size = {self.batch_size} is not divisible by the "
                            f"{ctx.world_size} processes of this run (--gpus x --nodes)")
        if device.type == "cpu":  # loader workers take cores too: do not oversubscribe
            cores = (os.cpu_count() or 1) // max(1, ctx.world_size)
            torch.set_num_threads(self.cpu_threads or max(1, cores - self.num_workers))
        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer = self._optimizer(model, device)
        base_lrs = [g["lr"] for g in optimizer.param_groups]
        lookahead = Lookahead([p for g in optimizer.param_groups for p in g["params"]],
                              self.lookahead_alpha, self.lookahead_k) if self.lookahead else None
        autocast_dtype = self.amp_dtype(device)
        scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
        ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else ctx.run_dir / "checkpoints"

        step = 0
        tokenizer = getattr(model, "tokenizer", None)
        latest = checkpoint.load_latest(ckpt_dir, map_location=device)
        if latest is not None:
            path, state = latest
            if tokenizer is not None and "vocab" in state:
                tokenizer.check_fits(state["vocab"], f"checkpoint '{path}'")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            if lookahead is not None and state.get("lookahead"):
                lookahead.load_state_dict(state["lookahead"])
            step = int(state["step"])
            rngs = state["rng"]
            _set_rng_state(rngs[ctx.rank] if ctx.rank < len(rngs) else rngs[0])
            ctx.info(f"resumed from {path} at step {step}")
        ctx.logger.rewind(step)  # a run killed before its first checkpoint starts over
        ctx.step = step
        if step >= self.max_steps:
            ctx.info(f"training already finished ({step} steps)")
            return model

        train_model: nn.Module = model
        if ctx.world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.compile:
            train_model = torch.compile(train_model)  # type: ignore[assignment]

        def save(at: int) -> None:
            rngs = dist.gather_objects(_rng_state())
            if ctx.rank == 0:
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "lookahead": lookahead.state_dict() if lookahead is not None else {},
                    "step": at,
                    "rng": rngs,
                }
                if tokenizer is not None:  # what a loader checks its vocabulary against
                    state["vocab"] = tokenizer.describe()
                checkpoint.save(state, ckpt_dir, at)
                checkpoint.prune(ckpt_dir, self.keep_last, self.keep_every)
            dist.barrier()

        bar = None
        if ctx.rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=self.max_steps, initial=step, desc="train", dynamic_ncols=True)
        model.train()
        seen, t0, first = 0, time.perf_counter(), True
        for batch in self._loader(ctx, step):
            mult = self.lr_multiplier(step)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * mult
            batch = _to_device(batch, device, self.channels_last)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                out = train_model(batch)
            if first:  # what the task returns is known only now: checked once
                contracts.check_task_output(out, contracts.label_of(
                    model, f"the model being trained ({type(model).__name__})"))
                first = False
            loss, scaled = _global_mean(out["loss"], out.get("weight"), ctx.world_size)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(scaled).backward()
            if self.clip_grad_norm:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            if lookahead is not None:
                lookahead.update()
            step += 1
            ctx.step = step
            seen += self.batch_size

            if step % self.log_every == 0 or step == self.max_steps:
                losses = {f"loss/{k}": dist.mean(v.float()).item() for k, v in out["losses"].items()}
                total = loss.item()
                elapsed = time.perf_counter() - t0
                metrics = {"loss/total": total, **losses, "throughput/images_per_s": seen / elapsed}
                for group in optimizer.param_groups:
                    metrics[f"lr/{group['name']}"] = group["lr"]
                ctx.log({f"{self.log_prefix}{k}": v for k, v in metrics.items()}, step)
                if bar is not None:
                    bar.set_postfix(loss=f"{total:.4f}")
                else:
                    ctx.info(f"step {step}/{self.max_steps} loss {total:.4f} "
                             f"({seen / elapsed:.1f} img/s)")
                seen, t0 = 0, time.perf_counter()
            if bar is not None:
                bar.update(1)
            stop = dist.any_true(_STOP.is_set())  # every rank stops at the same step
            if step % self.checkpoint_every == 0 or step == self.max_steps or stop:
                save(step)
                if ctx.rank == 0:
                    self._log_samples(model, ctx, step)
            if stop and step < self.max_steps:
                ctx.info(f"stop requested: checkpoint saved at step {step}")
                raise Preempted(step)
        if bar is not None:
            bar.close()
        return model
