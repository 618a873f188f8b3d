"""The paper's workflow as one command (specs/pipeline/quickstart.gin, smaller): every stage
runs, the downstream ones on the checkpoint the VOC07 sweep chose; killed, it resumes
without redoing finished stages; the same through the real local SLURM, with dependent
jobs, submitted once."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli import REPO, run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

DOWNSTREAM = ["imagenet", "inat", "coco", "lvis", "voc_det", "captioning"]
STAGES = ["pretrain", "voc07/step_0000003", "voc07/step_0000006", *DOWNSTREAM]

# the quickstart pipeline, smaller: 300 scenes, 6 pretraining steps (checkpoints 3 and 6),
# 32-px images, one epoch, two detection steps
SMALL = ["shapes_dir.images=300", "pretrain:trainer.max_steps=6",
         "pretrain:trainer.checkpoint_every=3", "pretrain:trainer.warmup_steps=1",
         "pretrain:trainer.log_every=1", "pretrain:batch_size=8", "pretrain:image_size=32",
         "pretrain:trainer.cpu_threads=1", "voc07:image_size=32", "imagenet:image_size=32",
         "imagenet:epochs=1", "imagenet:batch_size=32", "inat:image_size=32", "inat:epochs=1",
         "inat:batch_size=32", "detection_settings.max_steps=2",
         "detection_settings.checkpoint_every=2", "detection_settings.batch_size=2",
         "detection_settings.milestones=(1,)", "detection_settings.warmup_steps=1",
         "captioning:evaluators.coco_captioning.image_size=32",
         "captioning:evaluators.coco_captioning.resize=32"]


def _args(run_dir: Path, *extra: str) -> list[str]:
    return ["specs/pipeline/quickstart.gin", "--run_dir", str(run_dir),
            *[a for p in SMALL for a in ("--gin_param", p)], *extra]


def _sweep(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "voc07" / "sweep.csv", newline="") as f:
        return list(csv.DictReader(f))


def check_pipeline(run_dir: Path) -> int:
    """Every stage finished; the downstream ones on the best VOC07 checkpoint; the curve in
    the pretraining run's tensorboard; the report written. Returns the chosen step."""
    for stage in STAGES:
        assert (run_dir / stage / "metrics.json").is_file(), stage
    rows = _sweep(run_dir)
    assert [int(r["step"]) for r in rows] == [3, 6]
    best = max(rows, key=lambda r: (float(r["voc07/mAP"]), int(r["step"])))
    chosen = json.loads((run_dir / "best.json").read_text())
    assert chosen["step"] == int(best["step"]) and chosen["value"] == float(best["voc07/mAP"])
    checkpoint = run_dir / "pretrain" / "checkpoints" / f"step_{chosen['step']:07d}.pt"
    assert (run_dir / "best.pt").resolve() == checkpoint.resolve()
    link = run_dir / "best.pt"
    for stage in DOWNSTREAM:  # each loaded the chosen checkpoint, through the link
        line = f"weights from {link} (a link to {checkpoint.resolve()})"
        assert line in (run_dir / stage / "log.txt").read_text(), stage
    events = EventAccumulator(str(run_dir / "pretrain" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("voc07/mAP")] == [3, 6]
    assert [e.step for e in events.Scalars("loss/total")][:3] == [1, 2, 3]  # beside the loss
    summary = (run_dir / "summary.md").read_text()
    assert f"chosen checkpoint: step {chosen['step']}" in summary
    for stage in DOWNSTREAM:
        assert f"| {stage} |" in summary, (stage, summary)
    report = (run_dir / "report.md").read_text()
    assert f"{float(best['voc07/mAP']):.1f}" in report
    assert (run_dir / "report.html").is_file()
    return chosen["step"]


def _mtimes(run_dir: Path) -> dict[str, float]:
    return {s: (run_dir / s / "metrics.json").stat().st_mtime_ns for s in STAGES}


@pytest.mark.slow
def test_the_pipeline_runs_every_stage_on_the_chosen_checkpoint_and_resumes_after_a_kill(
        tmp_path, private_cache):
    run_dir = tmp_path / "pipe"
    env = {**os.environ, "VIRTEX_CACHE": str(private_cache)}
    proc = subprocess.Popen([sys.executable, "-m", "virtex.run", *_args(run_dir)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = run_dir / "voc07" / "step_0000003" / "metrics.json"
    deadline = time.time() + 600
    while not first.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.is_file(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else ""
    proc.send_signal(signal.SIGKILL)  # during the sweep: pretraining is finished
    proc.wait()
    pretrain = (run_dir / "pretrain" / "metrics.jsonl").read_text()

    res = run_cli(*_args(run_dir), env={"VIRTEX_CACHE": str(private_cache)}, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "virtex: pretrain: finished already, skipped" in out
    assert "virtex: voc07/step_0000003: finished already, skipped" in out
    assert "virtex: voc07/step_0000006: running in" in out
    assert (run_dir / "pretrain" / "metrics.jsonl").read_text() == pretrain  # not retrained
    check_pipeline(run_dir)
    assert "chosen checkpoint: step" in out  # the summary, printed at the end

    before = _mtimes(run_dir)
    res = run_cli(*_args(run_dir), env={"VIRTEX_CACHE": str(private_cache)}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("finished already, skipped") == len(STAGES)
    assert _mtimes(run_dir) == before


@pytest.mark.slow
@pytest.mark.requires("sinfo", how="`bash .ci/slurm.sh start` installs and starts a one-node "
                                   "SLURM on this machine")
def test_the_pipeline_runs_through_slurm_as_dependent_jobs_submitted_once(tmp_path, private_cache):
    from test_slurm import _logs, _state

    run_dir = tmp_path / "pipe"
    env = {"VIRTEX_CACHE": str(private_cache)}
    res = run_cli(*_args(run_dir, "--launcher", "slurm"), env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    record = json.loads((run_dir / "slurm" / "job.json").read_text())
    groups = record["groups"]
    try:
        assert sorted(groups) == sorted(["pretrain", "voc07", *DOWNSTREAM])
        lines = res.stdout.splitlines()
        assert f"submitted SLURM job {groups['pretrain']} for pretrain: 1 node(s) x 1 task(s), " \
               "time limit 60 min" in lines
        assert any(x.startswith(f"submitted SLURM job array {groups['voc07']} (2 tasks) for voc07")
                   and x.endswith(f"after after:{groups['pretrain']}") for x in lines), lines
        for stage in DOWNSTREAM:
            assert any(x.startswith(f"submitted SLURM job {groups[stage]} for {stage}")
                       and x.endswith(f"after afterok:{groups['voc07']}") for x in lines), lines

        # the same command while they run: nothing is submitted twice
        again = run_cli(*_args(run_dir, "--launcher", "slurm"), env=env, timeout=300)
        assert again.returncode == 0, again.stderr
        assert "submitted SLURM" not in again.stdout
        assert again.stdout.count("queued or running, not submitted again") == len(groups)
        assert json.loads((run_dir / "slurm" / "job.json").read_text())["groups"] == groups

        deadline = time.time() + 900
        while not all(_state(groups[s]) == "COMPLETED" for s in DOWNSTREAM):
            failed = [s for s, j in groups.items()
                      if _state(j) in ("FAILED", "CANCELLED", "TIMEOUT")]
            assert not failed and time.time() < deadline, (failed, _logs(run_dir))
            time.sleep(2)
    finally:
        for job_id in groups.values():
            subprocess.run(["scancel", job_id], capture_output=True)
    check_pipeline(run_dir)

    done = run_cli(*_args(run_dir, "--launcher", "slurm"), env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "submitted SLURM" not in done.stdout
    assert done.stdout.count("finished already, not submitted") == len(groups)
