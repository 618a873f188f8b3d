"""Images/s per core of pretraining batches: caption shards vs the COCO folder vs webdataset.

    python benchmarks/data.py [--images 1600] [--px 256] [--size 224] [--batch 32] [--workers 1]

The same ``--images`` built-in shapes images (``virtex.tools.make_shapes``, ``--px`` px on a
side, JPEG) are written in the COCO layout and as caption shards, then read in one process,
each the way a pretraining run reads them, to batches of ``--batch`` with ``--workers``
loader processes (0: in this process) and the pretraining train transform (random resized
crop to ``--size``, flip, colour jitter, normalise) and tokenisation:

- ``caption shards``: ``datasets.caption_shards`` through its trainer data source
  (:class:`virtex.data.shards.ShardSource`), as ``specs/pretrain/shards.gin`` trains;
- ``COCO folder``: ``datasets.coco_captions`` through the map-style source
  (:class:`virtex.data.source.MapSource`), as the COCO specs train;
- ``webdataset (plain)``: ``webdataset.WebDataset(urls)`` + its ``decode("pil")`` + the same
  transform and tokenizer + its ``batched``, in a plain ``DataLoader``: no virtex loading code.

Every layout runs on past the ``--images`` images (the shards are a stream, the folder and
webdataset go on to the next epoch), so each loader's prefetched batches (4 per worker) are
decoded and counted alike when it stops. The layouts alternate over ``--rounds`` rounds (machine load hits them alike); the best round
of each is reported. "seconds" and "images/s" are wall-clock; "images/s per core" is images
per CPU second of all the processes (this one and its loader workers, start-up included),
which other jobs on the machine disturb far less; the ratio to the folder is per core.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from virtex.plugins.data import caption_shards, coco_captions  # noqa: E402

from virtex.data import transforms as V  # noqa: E402
from virtex.data.readers import read_caption_strings  # noqa: E402
from virtex.data.source import MapSource  # noqa: E402
from virtex.data.tokenizer import SentencePieceTokenizer, build_vocab  # noqa: E402
from virtex.tools.make_shapes import generate  # noqa: E402


def scenes_for(train_images: int) -> int:
    """Scenes to generate so that the train split (4 of every 5) holds ``train_images``."""
    n = train_images
    while n - (n + 1) // 5 < train_images:
        n += 1
    return n


def plain_webdataset(urls: list[str], tokenizer: SentencePieceTokenizer, transform: Callable,
                     batch: int, workers: int, max_length: int = 30) -> Iterable[Any]:
    """webdataset's own pipeline: shards (repeated) -> decode("pil") -> transform -> batched."""
    import webdataset as wds

    def sample(s: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = transform({"image": s["jpg"], "caption": s["txt"]})
        ids = [tokenizer.sos_id, *tokenizer.encode(out["caption"]), tokenizer.eos_id][:max_length]
        forward = torch.tensor(ids, dtype=torch.long)
        return out["image"], forward, forward.flip(0)

    def collate(rows: list) -> dict[str, torch.Tensor]:
        images, forward, backward = zip(*rows)
        pad = torch.nn.utils.rnn.pad_sequence
        return {"image": torch.stack(images),
                "caption_tokens": pad(list(forward), batch_first=True, padding_value=tokenizer.pad_id),
                "noitpac_tokens": pad(list(backward), batch_first=True, padding_value=tokenizer.pad_id),
                "caption_lengths": torch.tensor([len(f) for f in forward])}

    dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False, repeat=True)
               .decode("pil").map(sample).batched(batch, collation_fn=collate))
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                       prefetch_factor=4 if workers else None)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished, reaped children (the loader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed_images(make: Callable[[], Iterable[Any]], images: int, batch: int
                 ) -> tuple[float, float]:
    """(wall seconds, CPU seconds of every process) to take batches of ``images`` images in
    all from a fresh ``make()``, loader start-up and shutdown included (webdataset's last
    batch of an epoch in each worker may be partial)."""
    cpu, start = cpu_seconds(), time.perf_counter()
    taken, batches = 0, iter(make())
    try:
        for b in batches:
            n = b["image"].shape[0]
            assert 0 < n <= batch and b["caption_tokens"].shape[0] == n
            taken += n
            if taken >= images:
                break
    finally:
        if hasattr(batches, "close"):  # a generator (the shard source): ends its loader
            batches.close()
        del batches
        gc.collect()
    wall = time.perf_counter() - start
    if multiprocessing.active_children():  # reaps the workers, so their CPU time counts
        raise SystemExit("loader workers are still running after the loader ended")
    if taken != images:
        raise SystemExit(f"a layout gave {taken} images, not {images}")
    return wall, cpu_seconds() - cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1600, help="images read per layout")
    ap.add_argument("--px", type=int, default=256, help="side of the generated images")
    ap.add_argument("--size", type=int, default=224, help="train crop size")
    ap.add_argument("--batch", type=int, default=32, help="batch size")
    ap.add_argument("--workers", type=int, default=1, help="loader processes (0: in-process)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating timing rounds")
    a = ap.parse_args(argv)
    if a.images < a.batch or a.batch < 1 or a.workers < 0 or a.rounds < 1:
        raise SystemExit("need --images >= --batch >= 1, --workers >= 0, --rounds >= 1")
    torch.set_num_threads(1)  # the loader workers run one thread each, as in training
    batches = a.images // a.batch
    n = batches * a.batch
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "shapes", images=scenes_for(a.images), seed=0,
                        min_size=a.px, max_size=a.px, formats=("coco", "shards"))
        captions = root / "coco" / "annotations" / "captions_train2017.json"
        tokenizer = SentencePieceTokenizer(build_vocab(read_caption_strings(captions),
                                                       Path(tmp) / "vocab", vocab_size=300))
        urls = sorted(str(p) for p in (root / "shards").glob("train-*.tar"))
        for path in [*urls, *(root / "coco" / "train2017").iterdir()]:
            path = Path(path)
            path.read_bytes()  # the page cache is warm for every layout alike
        transform = V.train_transform(a.size)
        shards = caption_shards(urls, tokenizer, transform)
        folder = coco_captions(str(root / "coco"), "train2017", tokenizer, transform)
        assert len(folder) == a.images, (len(folder), a.images)
        layouts: dict[str, Callable[[], Iterable[Any]]] = {
            "caption shards (virtex)": lambda: shards.as_source(a.batch, a.workers).batches(
                0, 0, 0, 1),
            "COCO folder (virtex)": lambda: MapSource(folder, a.batch, 4 * batches,
                                                      a.workers).batches(0, 0, 0, 1),
            "webdataset, plain pipeline": lambda: plain_webdataset(
                urls, tokenizer, transform, a.batch, a.workers),
        }
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in layouts}
        for _ in range(a.rounds):
            for name, make in layouts.items():
                runs[name].append(timed_images(make, n, a.batch))
    best = {name: (min(w for w, _ in r), min(c for _, c in r)) for name, r in runs.items()}
    folder_per_core = n / best["COCO folder (virtex)"][1]
    print(f"{n} images of {a.px}x{a.px} px (JPEG) to {a.size} px train crops, batch {a.batch}, "
          f"{a.workers} loader worker(s), best of {a.rounds} alternating rounds; "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}\n")
    print("| layout | images | seconds | images/s | images/s per core | ratio to folder |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (wall, cpu) in best.items():
        print(f"| {name} | {n} | {wall:.2f} | {n / wall:.1f} | {n / cpu:.1f} | "
              f"{n / cpu / folder_per_core:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
