"""Data sources: where :class:`virtex.engine.Trainer` takes its batches from.

The contract (:class:`DataSource`): ``source.batches(seed, start_step, rank, world_size)``
is an iterable of this rank's collated batches, the first for step ``start_step``, each
``batch_size // world_size`` samples of the global batch of its step (the trainer stops
at ``max_steps``). A source whose position is not a pure function of the step (a stream)
also has ``state_dict()`` / ``load_state_dict(state)``: the trainer saves each rank's
position in the checkpoint (key ``data``) and loads it before calling ``batches``.

:class:`MapSource` is the map-style source (a ``Dataset`` with ``__len__``): the batch of
step ``s`` is a pure function of ``(seed, s)`` (see :class:`StepBatchSampler`), so it needs
no saved position. To sample otherwise, subclass :class:`StepBatchSampler` (override
:meth:`StepBatchSampler.index`) and :class:`MapSource` (override :meth:`MapSource.sampler`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset

from virtex.data.loader import data_loader


@runtime_checkable
class DataSource(Protocol):
    """Batches for the trainer; ``batch_size`` is the global batch of one step."""

    batch_size: int

    def batches(self, seed: int, start_step: int, rank: int, world_size: int) -> Iterable[Any]:
        """This rank's collated batches of steps ``start_step, start_step + 1, ...``."""
        ...


@runtime_checkable
class StreamingDataset(Protocol):
    """A dataset that reads itself in order (e.g. caption shards) and so makes its own data
    source for the trainer's global batch and loader workers."""

    def as_source(self, batch_size: int, num_workers: int) -> DataSource:
        ...


class SampleSeeded(Dataset):
    """Seeds the CPU RNGs (torch, random, numpy) from the key before each sample, so
    augmentation is reproducible."""

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
        torch.default_generator.manual_seed(seed)  # the CPU RNG only: seeding every
        # device's (torch.manual_seed) costs ~1 ms a sample and would reseed a GPU's dropout
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return self.dataset[index]


class StepBatchSampler:
    """This rank's share of the global batch of every step in ``[start_step, max_steps)``,
    as lists of ``(dataset index, sample seed)`` keys for :class:`SampleSeeded`.

    Sample position ``p = step * batch + j`` is mapped to a dataset index by
    :meth:`index` (here: epoch ``p // size`` is a permutation seeded by ``(seed, epoch)``);
    the per-sample augmentation seed is :meth:`sample_seed` of ``(seed, p)``. Nothing
    depends on how many workers load the data or on where a run was resumed.
    """

    def __init__(self, size: int, global_batch: int, rank: int, world_size: int,
                 seed: int, start_step: int, max_steps: int):
        if global_batch % world_size:
            raise ValueError(f"batch_size {global_batch} is not divisible by {world_size} processes")
        self.size, self.batch, self.rank = size, global_batch, rank
        self.local = global_batch // world_size
        self.seed, self.start_step, self.max_steps = seed, start_step, max_steps
        self._perm: tuple[int, torch.Tensor] | None = None

    def index(self, position: int) -> int:
        """The dataset index of sample ``position`` (a pure function of ``(seed, position)``;
        subclasses override it to sample otherwise)."""
        epoch = position // self.size
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.size, generator=g))
        return int(self._perm[1][position % self.size])

    def sample_seed(self, position: int) -> int:
        """The augmentation seed of sample ``position``."""
        return (self.seed * 2_147_483_647 + position * 7919 + 12345) % (2**62)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.max_steps):
            first = step * self.batch + self.rank * self.local
            yield [(self.index(p), self.sample_seed(p)) for p in range(first, first + self.local)]

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)


class MapSource:
    """The map-style source: ``dataset[i]`` under :class:`SampleSeeded`, in the order of
    :meth:`sampler`, collated with ``dataset.collate_fn`` (if it has one) by ``num_workers``
    loader processes."""

    def __init__(self, dataset: Dataset, batch_size: int, max_steps: int,
                 num_workers: int = 0, pin_memory: bool = False):
        self.dataset, self.batch_size, self.max_steps = dataset, batch_size, max_steps
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def sampler(self, seed: int, start_step: int, rank: int, world_size: int) -> Iterable[list]:
        """The batches of sample keys (a :class:`StepBatchSampler` here)."""
        return StepBatchSampler(len(self.dataset), self.batch_size, rank, world_size,  # type: ignore[arg-type]
                                seed, start_step, self.max_steps)

    def batches(self, seed: int, start_step: int, rank: int, world_size: int) -> Iterable[Any]:
        workers = self.num_workers
        return data_loader(
            SampleSeeded(self.dataset),
            batch_sampler=self.sampler(seed, start_step, rank, world_size),
            num_workers=workers,
            collate_fn=getattr(self.dataset, "collate_fn", None),
            pin_memory=self.pin_memory,
            persistent_workers=False,
            # its own generator: the loader must not draw from the global RNG, whose
            # state (dropout, masking) is restored exactly on resume
            generator=torch.Generator().manual_seed(seed),
            prefetch_factor=4 if workers > 0 else None,
        )
