"""Caption shards: the web-scale layout (img2dataset ``--output_format webdataset``, RedCaps).

A shard is a POSIX tar whose members are grouped by key: ``KEY.jpg|jpeg|png|webp`` beside
``KEY.txt`` (the caption) and/or ``KEY.json`` (a caption field, ``caption_key``).
Shards are addressed as webdataset does: local paths, ``pipe:COMMAND`` and http(s) URLs,
streamed (webdataset's ``gopen`` and tar iterator), never downloaded whole. ``shards`` is
a brace pattern (``DIR/{00000..00127}.tar``), a list, or several sources joined with
``::``, each optionally weighted (``0.7:A/{0..9}.tar::0.3:B/{0..3}.tar``).

Order (deterministic for a seed). The sample streams are this run's ranks x loader
workers (``K`` in all); in epoch ``e`` of a source its shards are shuffled by
``(seed, source, e)`` and stream ``k`` reads every ``K``-th from ``k`` on, so no sample is
read twice in an epoch; inside a shard a seeded shuffle buffer reorders the samples. The
batch of step ``s`` of a rank comes from its stream ``s mod W`` (``W`` workers), and every
batch carries the position of its stream after it (epoch, shard, samples emitted from the
shard): a resumed run replays only the current shard of each stream, without decoding,
and continues at the exact next sample.

Bad samples (an undecodable image, no caption, a truncated shard, a URL that fails) are
skipped and counted (``bad_samples`` in the batches' ``stats``), never a crash or a hang.
"""

from __future__ import annotations

import functools
import io
import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand
import torch

from virtex.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_WEIGHT = re.compile(r"^(?P<w>\d+(?:\.\d*)?|\.\d+):(?P<rest>.+)$")


@dataclass(frozen=True)
class Source:
    urls: tuple[str, ...]
    weight: float


def parse_shards(shards: str | Sequence[str]) -> list[Source]:
    """Sources of ``shards`` (see the module docstring); a pattern that names nothing, or a
    local path that does not exist, is one error."""
    if isinstance(shards, str):
        parts = shards.split("::")
    else:
        parts = [str(s) for s in shards]
        if any("::" in p for p in parts):
            raise UserError("shards: give a list of shards or a '::'-joined string, not both")
        parts = ["\n".join(parts)]  # a list is one source
    sources = []
    for part in parts:
        weight, text = 1.0, part.strip()
        if (m := _WEIGHT.match(text)) and not text.startswith(("pipe:", "http")):
            weight, text = float(m["w"]), m["rest"]
        urls = [u for line in text.split("\n") if line.strip()
                for u in braceexpand.braceexpand(line.strip())]
        if not urls:
            raise UserError(f"shards: '{part}' names no shard")
        missing = [u for u in urls if "://" not in u and not u.startswith("pipe:")
                   and not Path(u).is_file()]
        if missing:
            raise UserError(f"shards: {len(missing)} of the {len(urls)} shards of '{part}' "
                            f"do not exist, e.g. '{missing[0]}'")
        if weight <= 0:
            raise UserError(f"shards: weight {weight} of '{part}' must be > 0")
        sources.append(Source(tuple(urls), weight))
    return sources


def read_shard(url: str) -> Iterator[dict[str, bytes]]:
    """The samples of one shard in tar order: ``{"__key__": key, ext: bytes, ...}``.

    Raises OSError/tarfile.TarError (or webdataset's errors) on a URL that fails or a
    truncated shard, after yielding what came before."""
    import webdataset as wds
    from webdataset import tariterators

    stream = wds.gopen(url)
    try:
        current: dict[str, Any] | None = None
        for member in tariterators.tar_file_iterator(stream):
            name = member["fname"]
            base, _, ext = Path(name).name.partition(".")
            key = str(Path(name).parent / base) if "/" in name else base
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext.lower()] = member["data"]
        if current is not None:
            yield current
    finally:
        stream.close()


def _caption(sample: dict[str, bytes], caption_key: str) -> str | None:
    if "txt" in sample:
        return sample["txt"].decode("utf-8", errors="replace").strip() or None
    if "json" in sample:
        try:
            value = json.loads(sample["json"]).get(caption_key)
        except (ValueError, AttributeError):
            return None
        return str(value).strip() or None if value is not None else None
    return None


def _image(sample: dict[str, bytes]) -> bytes | None:
    return next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)


def _rng(*parts: int) -> random.Random:
    value = 0
    for p in parts:
        value = (value * 1_000_003 + int(p) + 1) % (2**61 - 1)
    return random.Random(value)


@dataclass
class Position:
    """Where a stream is in one source: epoch, index of its shard in the epoch's share,
    and how many samples that shard has emitted (slots, bad ones included)."""

    epoch: int = 0
    shard: int = 0
    emitted: int = 0


class ShardStream:
    """One stream's samples of one source, from ``position`` on (see the module docstring)."""

    def __init__(self, source: Source, source_index: int, stream: int, streams: int,
                 seed: int, shuffle_buffer: int, caption_key: str,
                 position: Position | None = None):
        if len(source.urls) < streams:
            raise UserError(f"shards: {len(source.urls)} shards cannot be split over {streams} "
                            "loaders (ranks x workers) without reading a sample twice in an "
                            "epoch: use more shards or fewer workers/processes")
        self.source, self.index, self.stream, self.streams = source, source_index, stream, streams
        self.seed, self.buffer_size, self.caption_key = seed, shuffle_buffer, caption_key
        self.position = position or Position()
        self.bad = 0

    def share(self, epoch: int) -> list[str]:
        urls = list(self.source.urls)
        _rng(self.seed, self.index, epoch).shuffle(urls)
        return urls[self.stream::self.streams]

    def _shuffled(self, url: str, rng: random.Random) -> Iterator[dict[str, Any] | None]:
        """Raw samples of ``url`` through the shuffle buffer; None for a sample without an
        image or a caption (its slot counts, so replay stays exact)."""
        buffer: list[dict[str, Any] | None] = []
        try:
            for raw in read_shard(url):
                image, caption = _image(raw), _caption(raw, self.caption_key)
                item = None if image is None or caption is None else \
                    {"key": raw["__key__"], "image": image, "caption": caption, "url": url}
                if len(buffer) < self.buffer_size:
                    buffer.append(item)
                    continue
                i = rng.randrange(len(buffer))
                buffer[i], out = item, buffer[i]
                yield out
        except Exception:  # noqa: BLE001 - a failing URL or truncated tar: skip the rest
            self.bad += 1
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[tuple[dict[str, Any] | None, Position]]:
        """(sample or None, position after it), forever (epoch after epoch)."""
        pos = self.position
        while True:
            share, produced = self.share(pos.epoch), False
            while pos.shard < len(share):
                rng = _rng(self.seed, self.index, pos.epoch, self.stream, pos.shard)
                for slot, item in enumerate(self._shuffled(share[pos.shard], rng)):
                    if slot < pos.emitted:
                        continue  # replayed on resume, not decoded
                    pos.emitted, produced = slot + 1, True
                    yield item, Position(pos.epoch, pos.shard, pos.emitted)
                pos.shard, pos.emitted = pos.shard + 1, 0
            if not produced and not self._any_slot(pos.epoch):
                raise UserError(f"shards: none of the {len(share)} shards read by this loader "
                                f"(e.g. '{share[0]}') yields a sample: every one fails to "
                                "open or is empty")
            pos.epoch, pos.shard = pos.epoch + 1, 0

    def _any_slot(self, epoch: int) -> bool:
        """Whether the shards of ``epoch`` hold any sample (an epoch resumed at its end
        produces nothing new, which is not a failure)."""
        return any(next(iter(self._shuffled(url, random.Random(0))), False) is not False
                   for url in self.share(epoch))


def shard_sizes(urls: Sequence[str]) -> dict[str, int]:
    """Samples per shard, where known: ``sizes.json`` beside the shards (``{name: count}``)
    or img2dataset's per-shard ``NAME_stats.json`` (``successes``)."""
    sizes: dict[str, int] = {}
    for url in urls:
        if "://" in url or url.startswith("pipe:"):
            continue
        path = Path(url)
        table = path.parent / "sizes.json"
        if table.is_file():
            sizes.update({str(path.parent / k): int(v)
                          for k, v in json.loads(table.read_text()).items()})
        stats = path.with_name(path.name.removesuffix(".tar") + "_stats.json")
        if url not in sizes and stats.is_file():
            sizes[url] = int(json.loads(stats.read_text()).get("successes", 0))
    return {u: sizes[u] for u in urls if u in sizes}


Decoder = Callable[[dict[str, Any], random.Random], dict[str, torch.Tensor]]


def _seeded(seed: int, work: Callable[[], Any]) -> Any:
    """``work()`` with the CPU RNGs (torch, random, numpy) seeded from ``seed`` (augmentation
    reproducible); the training process's own RNG streams are left as they were."""
    import numpy as np

    def run() -> Any:
        torch.default_generator.manual_seed(seed)  # the CPU RNG only: seeding every
        # device's (torch.manual_seed) costs ~1 ms a sample and would reseed a GPU's dropout
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return work()

    if torch.utils.data.get_worker_info() is not None:
        return run()
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            return run()
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class CaptionShards(torch.utils.data.IterableDataset):
    """Batches of captioned images from tar shards, as :class:`ShardSource` configures it
    (items as :class:`virtex.data.datasets.CocoCaptionsDataset`'s, ``image_id`` the
    stream's sample counter). See the module docstring for order and resume."""

    def __init__(self, shards: str | Sequence[str], tokenizer, transform: Callable | None,
                 caption_key: str = "caption", shuffle_buffer: int = 1000,
                 max_caption_length: int = 30, num_samples: int | None = None):
        from virtex.data.datasets import collate_captions

        self.sources = parse_shards(shards)
        self.tokenizer, self.transform = tokenizer, transform
        self.caption_key, self.shuffle_buffer = caption_key, shuffle_buffer
        self.max_caption_length = max_caption_length
        urls = [u for s in self.sources for u in s.urls]
        sizes = shard_sizes(urls)
        self.num_samples = num_samples or (sum(sizes.values()) if len(sizes) == len(urls)
                                           else None)
        self.collate = functools.partial(collate_captions, pad_id=tokenizer.pad_id)
        self.plan: dict[str, Any] = {}

    def as_source(self, batch_size: int, num_workers: int) -> ShardSource:
        """The trainer's data source over these shards (global ``batch_size``)."""
        return ShardSource(self, batch_size, num_workers)

    def configure(self, seed: int, rank: int, world_size: int, workers: int, start_step: int,
                  local_batch: int, positions: dict[int, dict] | None = None) -> None:
        """Set the run this dataset serves (called by :class:`ShardSource` before loading)."""
        self.plan = dict(seed=seed, rank=rank, world_size=world_size, workers=max(1, workers),
                         start_step=start_step, local_batch=local_batch,
                         positions=positions or {})

    def _decode(self, item: dict[str, Any], counter: int, stream: int) -> dict:
        from virtex.data.datasets import _image_tensor, caption_tokens
        from virtex.data.transforms import load_image, open_image

        def work() -> dict:
            lazy = getattr(self.transform, "accepts_lazy_image", False)
            data = io.BytesIO(item["image"])
            sample = {"image": open_image(data) if lazy else load_image(data),
                      "caption": item["caption"]}
            if self.transform is not None:
                sample = self.transform(sample)
            forward, backward = caption_tokens(self.tokenizer, sample["caption"],
                                               self.max_caption_length)
            return {"image": _image_tensor(sample),
                    "caption_tokens": torch.tensor(forward, dtype=torch.long),
                    "noitpac_tokens": torch.tensor(backward, dtype=torch.long),
                    "caption_lengths": torch.tensor(len(forward), dtype=torch.long),
                    "image_id": torch.tensor(counter, dtype=torch.long)}

        return _seeded(int(_rng(self.plan["seed"], stream, counter).getrandbits(62)), work)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        p = self.plan
        if not p:
            raise RuntimeError("CaptionShards is read through ShardSource (configure first)")
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id if info else 0), p["workers"]
        local = (worker + p["start_step"]) % workers  # batch of step s: stream s mod W
        stream = p["rank"] * workers + local
        saved = p["positions"].get(local, {})
        streams = [ShardStream(src, j, stream, p["world_size"] * workers, p["seed"],
                               self.shuffle_buffer, self.caption_key,
                               Position(**saved["sources"][j]) if saved else None)
                   for j, src in enumerate(self.sources)]
        samples = [iter(s) for s in streams]
        total = sum(s.weight for s in self.sources)
        cumulative = [sum(s.weight for s in self.sources[: j + 1]) / total
                      for j in range(len(self.sources))]
        counter, bad = saved.get("count", 0), saved.get("bad", 0)
        positions = [s.position for s in streams]
        while True:
            items, keys = [], []
            while len(items) < p["local_batch"]:
                u = _rng(p["seed"], stream, counter, 7).random()
                j = next(i for i, c in enumerate(cumulative) if u < c or i == len(cumulative) - 1)
                item, positions[j] = next(samples[j])
                counter += 1
                if item is None:
                    bad += 1
                    continue
                try:
                    items.append(self._decode(item, counter, stream))
                except Exception:  # noqa: BLE001 - an undecodable image is skipped, counted
                    bad += 1
                    continue
                keys.append(item["key"])
            bad_shards = sum(s.bad for s in streams)
            state = {"count": counter, "bad": bad, "bad_shards": bad_shards,
                     "sources": [vars(pos).copy() for pos in positions]}
            yield {**self.collate(items), "_stream": (local, state), "_keys": keys}


class ShardSource:
    """The data source of a shard dataset: this rank's batches from ``start_step`` on, and
    the streams' positions as its state (part of the checkpoint)."""

    def __init__(self, dataset: CaptionShards, batch_size: int, num_workers: int = 0):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.positions: dict[int, dict] = {}
        self.layout: tuple[int, int] | None = None
        self.last_keys: list[str] = []  # the sample keys of the batch yielded last

    def batches(self, seed: int, start_step: int, rank: int, world_size: int
                ) -> Iterator[dict[str, torch.Tensor]]:
        from virtex.data.loader import data_loader

        layout = (world_size, max(1, self.num_workers))
        if self.positions and self.layout is not None and self.layout != layout:
            raise UserError(f"this run's shard positions were saved with {self.layout[0]} "
                            f"process(es) x {self.layout[1]} loader worker(s); resume it with "
                            "the same --gpus/--nodes and trainer.num_workers")
        self.layout = layout
        if self.batch_size % world_size:
            raise UserError(f"batch_size {self.batch_size} is not divisible by {world_size} "
                            "processes")
        self.dataset.configure(seed, rank, world_size, self.num_workers, start_step,
                               self.batch_size // world_size, self.positions)
        # its own generator: the loader must not draw its workers' base seed from the
        # global RNG, whose state (dropout) a resumed run restores exactly
        loader = data_loader(self.dataset, batch_size=None, num_workers=self.num_workers,
                             persistent_workers=False, generator=torch.Generator().manual_seed(seed),
                             prefetch_factor=4 if self.num_workers > 0 else None)
        for batch in loader:
            local, state = batch.pop("_stream")
            self.positions[int(local)], self.last_keys = state, batch.pop("_keys")
            yield batch

    def bad_samples(self) -> int:
        """Bad samples skipped so far by this rank's streams."""
        return sum(s["bad"] for s in self.positions.values())

    def state_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "positions": self.positions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.layout = tuple(state["layout"]) if state.get("layout") else None
        self.positions = {int(k): v for k, v in state.get("positions", {}).items()}
