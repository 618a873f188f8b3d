"""Images/s per core of the image pipeline: a plain PIL + torchvision baseline vs ours.

    python benchmarks/transforms.py [--images DIR] [--n 200] [--size 224] [--rounds 5] [--px 480 640]

Without ``--images`` it writes ``n`` synthetic-shapes JPEGs with sides of 480-640 px
(COCO-sized; ``--px``) with ``virtex.tools.make_shapes`` into a temp dir. All
pipelines run in this process on one thread, alternating in rounds so that machine
load hits them alike; the best round of each is reported as a markdown table. The
"full-size decode" row is ours with the reduced (DCT-scaled) decode switched off; the
"original's pixels" row is the paper specs' evaluation transform (cv2-exact bilinear).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from virtex.data import transforms as V  # noqa: E402
from virtex.data.readers import IMAGE_EXTENSIONS  # noqa: E402
from virtex.tools.make_shapes import generate  # noqa: E402

CAPTION = "a large red circle on the left of a small blue star"


def baseline_train(size: int) -> Callable[[Path], torch.Tensor]:
    """Full-size PIL decode + the usual torchvision (v1) training transforms."""
    tf = T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.ToTensor(),
        T.Normalize(V.IMAGENET_MEAN, V.IMAGENET_STD)])
    return lambda p: tf(Image.open(p).convert("RGB"))


def baseline_eval(size: int) -> Callable[[Path], torch.Tensor]:
    """Full-size PIL decode + torchvision Resize / CenterCrop / ToTensor / Normalize."""
    tf = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize(V.IMAGENET_MEAN, V.IMAGENET_STD)])
    return lambda p: tf(Image.open(p).convert("RGB"))


def ours(tf: V.Compose) -> Callable[[Path], torch.Tensor]:
    """Lazy open (header only) + our transforms, which pick the reduced decode size."""
    return lambda p: tf({"image": V.open_image(p), "caption": CAPTION})["image"]


def images_per_s(fn: Callable[[Path], torch.Tensor], paths: list[Path]) -> float:
    start = time.perf_counter()
    for p in paths:
        fn(p)
    return len(paths) / (time.perf_counter() - start)


def draft_histogram(paths: list[Path], size: int) -> Counter:
    """How often the crop-aware rule decodes at 1/1, 1/2, 1/4, 1/8 (one crop per image)."""
    crop = V.RandomResizedCrop(size)
    hist: Counter = Counter()
    for p in paths:
        with Image.open(p) as im:
            _, _, h, w = crop.params(*im.size)
        hist[V.draft_factor(w, h, size, size)] += 1
    return hist


def find_images(folder: Path, n: int) -> list[Path]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise SystemExit(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return paths[:n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, help="folder of images (default: generate)")
    ap.add_argument("--n", type=int, default=200, help="images to use")
    ap.add_argument("--size", type=int, default=224, help="output resolution")
    ap.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    ap.add_argument("--px", type=int, nargs=2, default=(480, 640), metavar=("MIN", "MAX"),
                    help="side range of generated images")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.images or generate(Path(tmp), images=a.n, seed=0, min_size=a.px[0],
                                      max_size=a.px[1]) / "coco"
        paths = find_images(folder, a.n)
        for p in paths:  # warm the page cache: we time decoding, not the disk
            p.read_bytes()
        sizes = [Image.open(p).size for p in paths]
        resize = round(a.size * 256 / 224)
        rows = {
            "train: crop 0.2-1 + flip + jitter 0.8 + normalize":
                (baseline_train(a.size), ours(V.train_transform(a.size))),
            "train, ours with full-size decode":
                (None, ours(V.train_transform(a.size, reduced_decode=False))),
            "eval: resize + center crop + normalize":
                (baseline_eval(a.size), ours(V.eval_transform(resize, a.size))),
            "eval, ours with full-size decode":
                (None, ours(V.Compose([V.Resize(resize, reduced_decode=False),
                                       V.CenterCrop(a.size), V.Normalize()]))),
            "eval, the original's pixels (resize_mode='exact', full-size decode)":
                (None, ours(V.eval_transform(resize, a.size, resize_mode="exact"))),
        }
        results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in rows}
        for _ in range(a.rounds):
            for name, (base, mine) in rows.items():
                if base is not None:
                    results[name][0].append(images_per_s(base, paths))
                results[name][1].append(images_per_s(mine, paths))
        hist = draft_histogram(paths, a.size)
    mean_w = statistics.mean(w for w, _ in sizes)
    mean_h = statistics.mean(h for _, h in sizes)
    print(f"{len(paths)} images, mean {mean_w:.0f}x{mean_h:.0f} px, output {a.size}, "
          f"1 thread, best of {a.rounds} alternating rounds (torch {torch.__version__})\n")
    print("| pipeline | baseline img/s | ours img/s | speed-up |")
    print("|---|---:|---:|---:|")
    reference = 0.0
    for name, (base, mine) in results.items():
        reference = max(base) if base else reference  # a "full-size" row shares the row above
        cell = f"{max(base):.0f}" if base else "(as above)"
        print(f"| {name} | {cell} | {max(mine):.0f} | {max(mine) / reference:.2f}x |")
    shares = ", ".join(f"1/{k}: {hist[k] / len(paths):.0%}" for k in sorted(hist))
    print(f"\ntrain crops decoded at (crop-aware draft rule): {shares}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
