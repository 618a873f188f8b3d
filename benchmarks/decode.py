"""Captions/s of both beam searches ('paper' and 'standard'), without and with the KV cache.

    python benchmarks/decode.py [--device cuda] [--batch 8] [--beam 5] [--steps 30] [--threads N]
                                [--rounds R] [--quick] [--profile]

The model is the paper's VirTex: ResNet-50 + a 1-layer, 2048-wide Transformer head
(L1_H2048_A32_F8192), vocabulary 10000, random weights, 224 px images. Each decoder
(``decoder='paper'``, the original VirTex search; ``'standard'``, ours) decodes the same
visual features in this process with ``--steps`` steps of beam search, either re-running
the decoder over the whole prefix at every step ("naive") or feeding one token per step
against cached keys/values ("cached"). The [EOS] and [SOS] output biases are set to -1e4
so that every beam of every run goes all ``--steps`` steps (checked). The ResNet forward,
the same for all, is timed on its own row. ``--quick`` (for a CPU) uses 2 images and
10 steps. Each runs once to warm up, then ``--rounds`` times, alternating; the best round
counts. ``--profile`` prints where the cached paper search spends its time.
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

PAD, SOS, EOS = 0, 1, 2  # the original vocabulary's layout
RUNS = {f"{decoder}, {path}": (decoder, path == "cached")
        for decoder in ("paper", "standard") for path in ("naive", "cached")}


def build(vocab: int, steps: int, device: torch.device) -> CaptioningModel:
    visual = ResNetBackbone("resnet50")
    head = TransformerTextualHead(visual.out_channels, vocab, size="L1_H2048_A32_F8192",
                                  max_caption_length=steps, padding_idx=PAD)
    with torch.no_grad():
        head.output.bias[[SOS, EOS]] = -1e4  # no caption ends early
    return CaptioningModel(visual, head, sos_idx=SOS, eos_idx=EOS).to(device).eval()


def caption(model: CaptioningModel, features: torch.Tensor, beam: int, steps: int,
            decoder: str, use_cache: bool) -> list[list[int]]:
    return decoding.generate(model.textual, features, "beam", sos_idx=SOS, eos_idx=EOS,
                             beam_size=beam, max_length=steps, use_cache=use_cache,
                             decoder=decoder)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def profile(model: CaptioningModel, features: torch.Tensor, beam: int, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        caption(model, features, beam, steps, "paper", True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8, help="images per batch")
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="decoding steps (all are run)")
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--size", type=int, default=224, help="image side in pixels")
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds per run")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="2 images, 10 steps (a smoke test)")
    ap.add_argument("--profile", action="store_true", help="profile the cached paper search")
    a = ap.parse_args(argv)
    if a.quick:
        a.batch, a.steps = min(a.batch, 2), min(a.steps, 10)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = build(a.vocab, a.steps, device)
    images = torch.randn(a.batch, 3, a.size, a.size, device=device)

    best = {name: float("inf") for name in ["visual", *RUNS]}
    outputs = {}
    with torch.inference_mode():
        features = model.visual(images)
        for decoder, use_cache in RUNS.values():  # warm-up on one image
            caption(model, features[:1], a.beam, a.steps, decoder, use_cache)
        if a.profile:
            profile(model, features, a.beam, a.steps)
        for _ in range(a.rounds):
            seconds, features = timed(lambda: model.visual(images), device)
            best["visual"] = min(best["visual"], seconds)
            for name, (decoder, use_cache) in RUNS.items():
                seconds, outputs[name] = timed(
                    lambda d=decoder, c=use_cache, f=features: caption(
                        model, f, a.beam, a.steps, d, c), device)
                best[name] = min(best[name], seconds)

    lengths = {len(ids) for out in outputs.values() for ids in out}
    if lengths != {a.steps}:
        raise SystemExit(f"expected every caption to have {a.steps} tokens, got lengths {lengths}")
    dev, n, visual = device_name(device), a.batch, best.pop("visual")
    print(f"VirTex R-50 + L1_H2048 head, vocab {a.vocab}, {a.size} px, batch {n}, "
          f"beam {a.beam}, {a.steps} steps, torch {torch.__version__}\n")
    print("| decoder, path | device | images | seconds | captions/s | speed-up vs naive |")
    print("|---|---|---:|---:|---:|---:|")
    for name, seconds in best.items():
        naive = best[name.split(",")[0] + ", naive"]
        print(f"| {name} | {dev} | {n} | {seconds:.3f} | {n / seconds:.2f} | "
              f"{naive / seconds:.1f}x |")
    print(f"| (ResNet-50 forward, same for all) | {dev} | {n} | {visual:.3f} | "
          f"({n / visual:.1f} images/s) | |")
    print()
    for decoder in ("paper", "standard"):
        same = sum(x == y for x, y in zip(outputs[f"{decoder}, naive"],
                                          outputs[f"{decoder}, cached"]))
        print(f"{decoder}: identical captions naive vs cached: {same}/{n}; images to captions "
              f"(ResNet + search): {n / (visual + best[f'{decoder}, cached']):.2f} captions/s "
              "cached")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
