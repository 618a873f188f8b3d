"""Images/s and peak memory of a bicaptioning ResNet-50 (L1 H2048) training step.

Eager fp32 (the reference) against our fast settings, in one process:
``python benchmarks/train_step.py [--device cuda] [--batch 64] [--steps 20]``.
On CPU it uses a smaller batch and image by default (``--quick``).
"""

from __future__ import annotations

import argparse
import time

import torch
from virtex.plugins.models.objectives import BicaptioningModel

from virtex.engine import param_groups
from virtex.models.textual import TransformerTextualHead
from virtex.models.visual import ResNetBackbone

VOCAB = 10000


def make_batch(n: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, VOCAB, (n, 20), generator=g)
    tokens[:, 0], tokens[:, -1] = 2, 3
    return {"image": torch.randn(n, 3, size, size, generator=g).to(device),
            "caption_tokens": tokens.to(device), "noitpac_tokens": tokens.flip(1).to(device)}


def run(config: dict, batch: dict, steps: int, device: torch.device) -> tuple[float, float]:
    torch.manual_seed(0)
    model = BicaptioningModel(ResNetBackbone("resnet50"),
                              TransformerTextualHead(2048, VOCAB, size="L1_H2048_A32_F8192")).to(device)
    if config["channels_last"]:
        model.to(memory_format=torch.channels_last)
        batch = {**batch, "image": batch["image"].contiguous(memory_format=torch.channels_last)}
    fused = config["fused"] and device.type == "cuda"
    opt = torch.optim.SGD(param_groups(model, 0.001, 0.2, 1e-4), lr=0.001, momentum=0.9,
                          fused=fused or None)
    step_model = torch.compile(model) if config["compile"] else model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config["amp"] or "")
    scaler = torch.amp.GradScaler(device.type, enabled=config["amp"] == "fp16")

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = step_model(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(3):  # warm-up (and compilation)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return steps * batch["image"].shape[0] / seconds, peak


CONFIGS = {
    "eager fp32 (reference)": dict(channels_last=False, amp=None, fused=False, compile=False),
    "channels_last": dict(channels_last=True, amp=None, fused=False, compile=False),
    "channels_last + bf16": dict(channels_last=True, amp="bf16", fused=True, compile=False),
    "channels_last + fp16 + scaler": dict(channels_last=True, amp="fp16", fused=True, compile=False),
    "channels_last + bf16 + compile": dict(channels_last=True, amp="bf16", fused=True, compile=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--skip_compile", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n, size = args.batch or (64 if cuda else 4), args.size or (224 if cuda else 128)
    steps = args.steps or (20 if cuda else 3)
    if cuda:
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"bicaptioning R50 + L1_H2048 training step, batch {n}, {size}px, {steps} steps on {name}\n")
    print("| setting | images/s | peak GPU memory (GiB) | speed-up |")
    print("|---|---:|---:|---:|")
    base = None
    for label, config in CONFIGS.items():
        if config["compile"] and args.skip_compile:
            continue
        if not cuda and config["amp"] == "fp16":
            continue
        ips, peak = run(config, make_batch(n, size, device), steps, device)
        base = base or ips
        print(f"| {label} | {ips:.1f} | {peak:.2f} | {ips / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
