"""Pretraining from caption shards: 2 processes, SIGKILLed mid-epoch and restarted with the
same command, give bitwise the same loss at every later step as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli import REPO, logged_losses, run_cli, tiny_pretrain

_losses = logged_losses


@pytest.mark.slow
def test_two_process_shard_run_killed_mid_epoch_resumes_bitwise(shapes_root, tmp_path):
    spec, params = tiny_pretrain(tmp_path, shapes_root / "coco", batch_size=4, max_steps=16,
                                 warmup_steps=2, checkpoint_every=5, log_every=1,
                                 num_workers=2)
    shards = f"{shapes_root}/shards/train-{{00000..00007}}.tar"
    with open(spec, "a") as f:  # the same model, its data from the shards
        f.write("trainer.dataset = @datasets.caption_shards()\n"
                "datasets.caption_shards.tokenizer = @tokenizer()\n"
                "datasets.caption_shards.transform = @transforms.train()\n"
                "datasets.caption_shards.shuffle_buffer = 4\n"
                f"datasets.caption_shards.shards = '{shards}'\n")
    common = [str(spec), *params, "--gpus", "2"]
    env = {"VIRTEX_CACHE": str(tmp_path / "cache")}
    ref = tmp_path / "reference"
    res = run_cli(*common, "--run_dir", str(ref), env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    expected = _losses(ref)
    assert sorted(expected) == list(range(1, 17))
    # each of the 4 streams (2 ranks x 2 workers) holds 12 samples an epoch and gives one
    # sample a step every other step: 16 steps are 1.33 epochs, the kill is mid-epoch
    state = torch.load(ref / "checkpoints" / "step_0000016.pt", weights_only=True)
    assert len(state["data"]) == 2 and all(len(d["positions"]) == 2 for d in state["data"])

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "virtex.run", *common, "--run_dir",
                             str(killed)], cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:  # after the step-5 checkpoint, before step 10's
        log = killed / "metrics.jsonl"
        if log.is_file() and any(json.loads(x).get("step", 0) >= 7
                                 for x in log.read_text().split("\n") if x):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # every process of the run, loader workers too
    proc.wait()
    assert 7 <= max(_losses(killed)) < 10
    res = run_cli(*common, "--run_dir", str(killed), env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    assert _losses(killed) == expected  # bitwise, every step
