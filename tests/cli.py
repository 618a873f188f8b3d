"""Helpers for tests that run ``python -m virtex.run`` as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | str | None = None, pythonpath: list[Path] | None = None,
            timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.setdefault("VIRTEX_CACHE", str(Path(cwd or REPO) / ".virtex_cache"))
    if pythonpath:
        full_env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "virtex.run", *args], cwd=cwd or REPO, env=full_env,
        capture_output=True, text=True, timeout=timeout,
    )


def make_distribution(site: Path, dist: str, modules: dict[str, str], entry_points: dict[str, str]) -> Path:
    """A real installed distribution (dist-info with entry_points.txt) under ``site``."""
    site.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (site / f"{name}.py").write_text(source)
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[virtex]\n{lines}")
    return site


def tiny_pretrain(directory: Path, coco: Path, batch_size: int = 8, **trainer: object
                  ) -> tuple[Path, list[str]]:
    """A tiny bicaptioning spec (ResNet-18, L1_H64 head, 32 px, vocabulary 300) written to
    ``directory/tiny_pretrain.gin``, and the ``--gin_param`` arguments pointing it at a shapes
    COCO tree. ``trainer`` sets ``trainer.<name>`` bindings (data loading in-process and no
    permanent checkpoints unless given)."""
    bindings = {"keep_every": None, "num_workers": 0, **trainer}
    lines = [
        "include 'pretrain/_base.gin'",
        "include 'models/bicaptioning.gin'",
        "visual = @backbones.resnet18()",
        "textual_size = 'L1_H64_A2_F128'",
        "image_size = 32",
        f"batch_size = {batch_size}",
        "data_root = %gin.REQUIRED",
        "captions = %gin.REQUIRED",
        "tokenizer.model = None",
        "tokenizer.captions = %captions",
        "tokenizer.vocab_size = 300",
        *(f"trainer.{name} = {value!r}" for name, value in bindings.items()),
    ]
    spec = Path(directory) / "tiny_pretrain.gin"
    spec.write_text("\n".join(lines) + "\n")
    captions = Path(coco) / "annotations" / "captions_train2017.json"
    return spec, ["--gin_param", f"data_root={coco}", "--gin_param", f"captions={captions}"]


def logged_losses(run_dir: Path) -> dict[int, float]:
    """Last logged total loss at every step (a resumed run re-logs redone steps)."""
    import json

    out: dict[int, float] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss/total" in row:
            out[row["step"]] = row["loss/total"]
    return out


def shapes_shards(directory: Path, images: int, seed: int = 0) -> list[str]:
    """Write the built-in shapes as caption shards with ``python -m virtex.tools.make_shapes
    --format shards`` under ``directory`` and return the spec lines that make a pretraining
    spec read them (``datasets.caption_shards``, the spec's tokenizer and train transform)."""
    out = Path(directory) / "shapes_shards"
    res = subprocess.run([sys.executable, "-m", "virtex.tools.make_shapes", "--out", str(out),
                          "--images", str(images), "--seed", str(seed), "--format", "shards"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    tars = sorted((out / "shards").glob("train-*.tar"))
    assert len(tars) >= 8, tars
    pattern = f"{out}/shards/train-{{00000..{len(tars) - 1:05d}}}.tar"
    return ["trainer.dataset = @datasets.caption_shards()",
            f"datasets.caption_shards.shards = '{pattern}'",
            "datasets.caption_shards.tokenizer = @tokenizer()",
            "datasets.caption_shards.transform = @transforms.train()"]
