"""Pretraining through the runner: run dirs, every paper spec, exact kill-and-resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli import REPO, logged_losses, run_cli, tiny_pretrain

from virtex.checkpoint import list_checkpoints
from virtex.run import main


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory, shapes_root):
    return tiny_pretrain(tmp_path_factory.mktemp("spec"), shapes_root / "coco", max_steps=12,
                         warmup_steps=2, checkpoint_every=4, log_every=1)


_losses = logged_losses


def test_pretraining_writes_a_complete_run_dir(tiny_spec, tmp_path, monkeypatch):
    spec, params = tiny_spec
    monkeypatch.setenv("VIRTEX_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    assert main([str(spec), *params, "--run_dir", str(run_dir)]) == 0
    for name in ("operative_config.gin", "config.gin", "command.txt", "log.txt", "metrics.json",
                 "metrics.jsonl", "summary.md"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"loss/total", "loss/captioning_backward", "lr/backbone"} <= set(events.Tags()["scalars"])
    samples = [t for t in events.Tags()["tensors"] if t.startswith("captions/samples")]
    assert samples and len(events.Tensors(samples[0])) == 3  # one per checkpoint
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == [
        "step_0000004.pt", "step_0000008.pt", "step_0000012.pt"][-3:]
    state = torch.load(run_dir / "checkpoints" / "step_0000012.pt", weights_only=True)
    assert state["step"] == 12 and "optimizer" in state and state["rng"]
    assert "trainer.max_steps = 12" in (run_dir / "operative_config.gin").read_text()
    assert "tiny_pretrain.gin" in (run_dir / "command.txt").read_text()
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 13))
    # the same command again finds the finished run and does not train again
    assert main([str(spec), *params, "--run_dir", str(run_dir)]) == 0
    assert _losses(run_dir) == losses


def test_default_run_dir_is_keyed_by_the_config(tiny_spec, tmp_path, monkeypatch):
    spec, params = tiny_spec
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VIRTEX_CACHE", str(tmp_path / "cache"))
    args = [str(spec), *params, "--gin_param", "trainer.max_steps=2"]
    assert main(args) == 0
    assert main([*args, "--gin_param", "batch_size=4"]) == 0
    runs = sorted((tmp_path / "runs" / "tiny_pretrain").iterdir())
    assert len(runs) == 2 and all(len(r.name) == 8 for r in runs)


def _rows(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text()
                                           .splitlines()) if key in r}


def test_paper_fp16_amp_is_float32_on_cpu_and_resumes_exactly(tiny_spec, tmp_path, monkeypatch):
    spec, params = tiny_spec  # includes pretrain/_base.gin: amp='fp16', warmup from LR 0
    monkeypatch.setenv("VIRTEX_CACHE", str(tmp_path / "cache"))
    common = [str(spec), *params, "--gin_param", "trainer.max_steps=5"]
    fp16, fp32 = tmp_path / "fp16", tmp_path / "fp32"
    assert main([*common, "--run_dir", str(fp16)]) == 0
    assert "trainer.amp = 'fp16'" in (fp16 / "operative_config.gin").read_text()
    assert main([*common, "--gin_param", "trainer.amp=None", "--run_dir", str(fp32)]) == 0
    expected = _losses(fp32)
    assert sorted(expected) == list(range(1, 6)) and _losses(fp16) == expected  # bitwise
    state = torch.load(fp16 / "checkpoints" / "step_0000005.pt", weights_only=True)
    assert not state["scaler"]  # no gradient scaling on CPU
    # the original's warmup: step 1 at learning rate 0, step 2 at 1/2 (2 warmup steps)
    lrs = _rows(fp16, "lr/backbone")
    assert (lrs[1], lrs[2], lrs[3]) == (0.0, 0.1, 0.2)
    (fp16 / "checkpoints" / "step_0000005.pt").unlink()  # resume from step 4
    assert main([*common, "--run_dir", str(fp16)]) == 0
    assert "resumed from" in (fp16 / "log.txt").read_text()
    assert _losses(fp16) == expected


def test_bad_no_decay_is_one_line(tiny_spec, tmp_path, monkeypatch, capsys):
    spec, params = tiny_spec
    monkeypatch.setenv("VIRTEX_CACHE", str(tmp_path / "cache"))
    args = [str(spec), *params, "--gin_param", "trainer.no_decay='bias'", "--run_dir",
            str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainer.no_decay: unknown 'bias'" in err[0], err


PRETRAIN_SPECS = sorted(
    p.relative_to(REPO / "specs").as_posix() for p in (REPO / "specs" / "pretrain").rglob("*.gin")
    if not p.name.startswith("_"))


@pytest.mark.parametrize("name", PRETRAIN_SPECS)
def test_every_pretraining_spec_runs_a_few_steps(name, shapes_root, tmp_path, monkeypatch):
    monkeypatch.setenv("VIRTEX_CACHE", str(tmp_path / "cache"))
    coco = shapes_root / "coco"
    overrides = [
        f"data_root={coco}", "tokenizer.model=None",
        f"tokenizer.captions={coco}/annotations/captions_train2017.json",
        "tokenizer.vocab_size=300", "visual=@backbones.resnet18()", "image_size=32",
        "batch_size=4", "trainer.max_steps=2", "trainer.warmup_steps=1", "trainer.num_workers=0",
        "trainer.log_every=1",
    ]
    spec_text = (REPO / "specs" / name).read_text()
    if "textual_size" in spec_text:
        overrides.append("textual_size='L1_H64_A2_F128'")
    if "shards = %gin.REQUIRED" in spec_text:
        overrides.append(f"shards={shapes_root}/shards/train-{{00000..00007}}.tar")
    args = [f"specs/{name}", "--run_dir", str(tmp_path / "run")]
    for o in overrides:
        args += ["--gin_param", o]
    monkeypatch.chdir(REPO)
    assert main(args) == 0
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == [1, 2] and all(v == v and v > 0 for v in losses.values())


@pytest.mark.slow
def test_sigkill_and_resume_matches_an_uninterrupted_run_exactly(tiny_spec, tmp_path):
    spec, params = tiny_spec
    common = [str(spec), *params, "--gin_param", "trainer.max_steps=20",
              "--gin_param", "trainer.checkpoint_every=5"]
    env = {"VIRTEX_CACHE": str(tmp_path / "cache")}
    ref = tmp_path / "reference"
    res = run_cli(*common, "--run_dir", str(ref), env=env)
    assert res.returncode == 0, res.stderr
    expected = _losses(ref)
    assert sorted(expected) == list(range(1, 21))

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "virtex.run", *common, "--run_dir", str(killed)],
                            cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill between checkpoints, mid-run
        log = killed / "metrics.jsonl"
        if log.is_file() and any(json.loads(x).get("step", 0) >= 8 for x in log.read_text().split("\n") if x):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_before = max(_losses(killed))
    assert 8 <= steps_before < 20
    res = run_cli(*common, "--run_dir", str(killed), env=env)
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout
    assert _losses(killed) == expected  # bitwise, every step


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_first_step(tiny_spec, tmp_path):
    spec, params = tiny_spec
    common = [str(spec), *params, "--gin_param", "trainer.max_steps=2",
              "--gin_param", "backbones.resnet18.frozen_bn=True",
              "--gin_param", "textual_heads.transformer.dropout=0.0"]
    env = {"VIRTEX_CACHE": str(tmp_path / "cache")}
    one = run_cli(*common, "--run_dir", str(tmp_path / "one"), env=env)
    assert one.returncode == 0, one.stderr
    two = run_cli(*common, "--gpus", "2", "--run_dir", str(tmp_path / "two"), env=env)
    assert two.returncode == 0, two.stderr
    assert "2 process(es)" in (tmp_path / "two" / "log.txt").read_text()
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert l1[1] == pytest.approx(l2[1], rel=1e-5, abs=1e-6)
    assert l1[2] == pytest.approx(l2[2], rel=1e-4)
