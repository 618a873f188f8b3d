"""Captions/s of both beam searches ('paper' and 'standard'), without and with the KV cache.

    python benchmarks/decode.py [--device cuda] [--batch 32] [--naive-batch 4] [--beam 5]
                                [--steps 30] [--threads N] [--rounds R] [--decoders paper]
                                [--quick] [--profile]

The model is the paper's VirTex: ResNet-50 + a 1-layer, 2048-wide Transformer head
(L1_H2048_A32_F8192), vocabulary 10000, random weights, 224 px images. Each decoder
(``decoder='paper'``, the original VirTex search; ``'standard'``, ours) decodes the same
visual features in this process with ``--steps`` steps of beam search, either re-running
the decoder over the whole prefix at every step ("naive"; for the paper search this is the
original's step: every beam runs the whole textual head, its image's visual projection
included) or feeding one token per step against cached keys/values ("cached"). The [EOS]
and [SOS] output biases are set to -1e4 so that every beam of every run goes all
``--steps`` steps (checked). The ResNet forward,
the same for all, is timed on its own row. The naive runs decode the first
``--naive-batch`` images only (they are compute-bound from a few images on, so captions/s
hardly depends on it; the cached runs need a large batch to stop waiting for the weights
to stream from memory at every step); ``--naive-batch 0`` = ``--batch``. ``--quick`` (for
a CPU) uses 2 images and 10 steps. Each runs once to warm up, then ``--rounds`` times,
alternating. The table gives each run's best round and two speed-ups: best round against
best round, and the median over rounds of each round's cached run against the naive run
just before it. On a shared machine the best rounds of two runs may come from a quiet and a
busy moment; the paired rounds see the same moment. Each round's speed-up is printed
below the table. ``--decoders`` limits the runs to the named decoders. ``--profile`` prints
where the cached paper search spends its time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import timed  # noqa: E402
from virtex.plugins.models.objectives import CaptioningModel  # noqa: E402

from virtex.models import decoding  # noqa: E402
from virtex.models.textual import TransformerTextualHead  # noqa: E402
from virtex.models.visual import ResNetBackbone  # noqa: E402

PAD, SOS, EOS = 0, 1, 2  # the original vocabulary's layout
DECODERS = ("paper", "standard")


def runs(decoders: list[str]) -> dict[str, tuple[str, bool]]:
    """'decoder, path' -> (decoder, use_cache); each decoder's naive run comes just before
    its cached one."""
    return {f"{decoder}, {path}": (decoder, path == "cached")
            for decoder in decoders for path in ("naive", "cached")}


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
    ap.add_argument("--batch", type=int, default=32, help="images per batch (cached runs)")
    ap.add_argument("--naive-batch", type=int, default=4, help="images of the naive runs")
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="decoding steps (all are run)")
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--size", type=int, default=224, help="image side in pixels")
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds per run")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="2 images, 10 steps (a smoke test)")
    ap.add_argument("--decoders", default=",".join(DECODERS),
                    help="comma-separated decoders to run (default: paper,standard)")
    ap.add_argument("--profile", action="store_true", help="profile the cached paper search")
    a = ap.parse_args(argv)
    decoders = a.decoders.split(",")
    if not decoders or not set(decoders) <= set(DECODERS):
        ap.error(f"--decoders: expected names from {','.join(DECODERS)}, got {a.decoders!r}")
    named = runs(decoders)
    if a.quick:
        a.batch, a.steps = min(a.batch, 2), min(a.steps, 10)
    a.naive_batch = min(a.naive_batch or a.batch, a.batch)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = build(a.vocab, a.steps, device)
    images = torch.randn(a.batch, 3, a.size, a.size, device=device)

    best = {name: float("inf") for name in ["visual", *named]}
    per_round: dict[str, list[float]] = {decoder: [] for decoder in decoders}
    outputs = {}
    with torch.inference_mode():
        features = model.visual(images)
        for decoder, use_cache in named.values():  # warm-up on one image
            caption(model, features[:1], a.beam, a.steps, decoder, use_cache)
        if a.profile:
            profile(model, features, a.beam, a.steps)
        for _ in range(a.rounds):
            seconds, features = timed(lambda: model.visual(images), device)
            best["visual"] = min(best["visual"], seconds)
            round_rate = {}
            for name, (decoder, use_cache) in named.items():
                batch = features if use_cache else features[: a.naive_batch]
                seconds, outputs[name] = timed(
                    lambda d=decoder, c=use_cache, f=batch: caption(
                        model, f, a.beam, a.steps, d, c), device)
                best[name] = min(best[name], seconds)
                round_rate[name] = batch.size(0) / seconds
            for decoder in decoders:
                per_round[decoder].append(round_rate[f"{decoder}, cached"]
                                          / round_rate[f"{decoder}, naive"])

    lengths = {len(ids) for out in outputs.values() for ids in out}
    if lengths != {a.steps}:
        raise SystemExit(f"expected every caption to have {a.steps} tokens, got lengths {lengths}")
    dev, visual = device_name(device), best.pop("visual")
    images_of = {name: len(out) for name, out in outputs.items()}
    print(f"VirTex R-50 + L1_H2048 head, vocab {a.vocab}, {a.size} px, batch {a.batch} "
          f"(naive: {a.naive_batch}), "
          f"beam {a.beam}, {a.steps} steps, torch {torch.__version__}\n")
    print("| decoder, path | device | images | seconds | captions/s | speed-up vs naive: "
          "best rounds | median of paired rounds |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rate = {name: images_of[name] / seconds for name, seconds in best.items()}
    for name, seconds in best.items():
        decoder, path = name.split(", ")
        paired = statistics.median(per_round[decoder]) if path == "cached" else 1.0
        print(f"| {name} | {dev} | {images_of[name]} | {seconds:.3f} | {rate[name]:.3f} | "
              f"{rate[name] / rate[decoder + ', naive']:.1f}x | {paired:.1f}x |")
    print(f"| (ResNet-50 forward, same for all) | {dev} | {a.batch} | {visual:.3f} | "
          f"({a.batch / visual:.1f} images/s) | | |")
    print()
    for decoder in decoders:
        print(f"{decoder}: speed-up of each round (cached vs the naive run before it): "
              f"{', '.join(f'{r:.1f}x' for r in per_round[decoder])}")
    for decoder in decoders:
        same = sum(x == y for x, y in zip(outputs[f"{decoder}, naive"],
                                          outputs[f"{decoder}, cached"]))
        cached = a.batch / (visual + best[f"{decoder}, cached"])
        print(f"{decoder}: identical captions naive vs cached: {same}/{a.naive_batch}; "
              f"images to captions (ResNet + cached search): {cached:.3f} captions/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
