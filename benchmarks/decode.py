"""Captions/s of beam search without and with the KV cache.

    python benchmarks/decode.py [--device cuda] [--batch 32] [--beam 5] [--steps 30] [--quick]

The model is the paper's VirTex: ResNet-50 + a 1-layer, 2048-wide Transformer head
(L1_H2048_A32_F8192), vocabulary 10000, random weights, 224 px images. Both methods
decode the same visual features in this process with ``--steps`` steps of beam search,
either re-running the decoder over the whole prefix at every step ("naive") or feeding
one token per step against cached keys/values ("cached"). [EOS] is set to the [SOS]
id, which decoding never emits, so every beam of both methods runs exactly ``--steps``
steps (checked). The ResNet forward, the same for both, is timed on its own row and
added back for the images-to-captions line. ``--quick`` (for a CPU) uses 4 images.
Each runs once to warm up, then ``--rounds`` times, alternating; the best round counts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import timed  # noqa: E402

from virtex.models import decoding  # noqa: E402
from virtex.models.objectives import CaptioningModel  # noqa: E402
from virtex.models.textual import TransformerTextualHead  # noqa: E402
from virtex.models.visual import ResNetBackbone  # noqa: E402

SOS = 2


def build(vocab: int, steps: int, device: torch.device) -> CaptioningModel:
    visual = ResNetBackbone("resnet50")
    head = TransformerTextualHead(visual.out_channels, vocab, size="L1_H2048_A32_F8192",
                                  max_caption_length=steps)
    return CaptioningModel(visual, head, sos_idx=SOS, eos_idx=SOS).to(device).eval()


def caption(model: CaptioningModel, features: torch.Tensor, beam: int, steps: int,
            use_cache: bool) -> list[list[int]]:
    return decoding.beam_search(model.textual, features, sos_idx=SOS, eos_idx=SOS,
                                max_length=steps, beam_size=beam, use_cache=use_cache)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32, help="images per batch")
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="decoding steps (all are run)")
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--size", type=int, default=224, help="image side in pixels")
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds per method")
    ap.add_argument("--quick", action="store_true", help="4 images (for a CPU)")
    a = ap.parse_args(argv)
    if a.quick:
        a.batch = min(a.batch, 4)
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = build(a.vocab, a.steps, device)
    images = torch.randn(a.batch, 3, a.size, a.size, device=device)
    methods = {"naive (no cache)": False, "cached (KV cache)": True}

    best = {name: float("inf") for name in ["visual", *methods]}
    outputs = {}
    with torch.inference_mode():
        features = model.visual(images)
        for use_cache in methods.values():  # warm-up on one image
            caption(model, features[:1], a.beam, a.steps, use_cache)
        for _ in range(a.rounds):
            seconds, features = timed(lambda: model.visual(images), device)
            best["visual"] = min(best["visual"], seconds)
            for name, use_cache in methods.items():
                seconds, outputs[name] = timed(
                    lambda c=use_cache, f=features: caption(model, f, a.beam, a.steps, c), device)
                best[name] = min(best[name], seconds)

    lengths = {len(ids) for out in outputs.values() for ids in out}
    if lengths != {a.steps}:
        raise SystemExit(f"expected every caption to have {a.steps} tokens, got lengths {lengths}")
    same = sum(x == y for x, y in zip(*outputs.values()))
    dev, n, visual = device_name(device), a.batch, best.pop("visual")
    naive = best["naive (no cache)"]
    print(f"VirTex R-50 + L1_H2048 head, vocab {a.vocab}, {a.size} px, batch {n}, "
          f"beam {a.beam}, {a.steps} steps, torch {torch.__version__}\n")
    print("| method | device | images | seconds | captions/s | speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for name, seconds in best.items():
        print(f"| beam search, {name} | {dev} | {n} | {seconds:.3f} | {n / seconds:.2f} | "
              f"{naive / seconds:.1f}x |")
    print(f"| (ResNet-50 forward, same for both) | {dev} | {n} | {visual:.3f} | "
          f"({n / visual:.1f} images/s) | |")
    cached = best["cached (KV cache)"]
    print(f"\nimages to captions (ResNet + beam search): naive {n / (visual + naive):.2f}, "
          f"cached {n / (visual + cached):.2f} captions/s, "
          f"{(visual + naive) / (visual + cached):.1f}x")
    print(f"identical captions from both methods: {same}/{n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
