"""Faults a run must survive: a second start on a held run directory, another config in
the same directory, kill -9 during checkpoint writes, Ctrl-C, a full disk, a read-only
run directory. Each checks the exit code, the one error line and what the run directory
holds afterwards (no temporaries, loadable checkpoints, metrics logged once per step)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli import REPO, run_cli, tiny_pretrain

from virtex.checkpoint import list_checkpoints


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shapes_root):
    """A tiny pretraining spec (ResNet-18, 32 px) with a checkpoint at every step; it binds
    the paper's learning rate (Trainer's default) so that config.gin records it."""
    spec, params = tiny_pretrain(tmp_path_factory.mktemp("spec"), shapes_root / "coco",
                                 batch_size=4, max_steps=3, warmup_steps=1, checkpoint_every=1,
                                 log_every=1, keep_last=10, lr=0.001)
    cache = tmp_path_factory.mktemp("cache")
    return [str(spec), *params], {"VIRTEX_CACHE": str(cache)}


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss/total"]) for r in rows if "loss/total" in r]


def _temporaries(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("*.tmp"))


def _error_line(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def _as_in_a_terminal() -> None:
    """Ctrl-C as a terminal delivers it: a run started from a background job (nohup, '&')
    inherits SIGINT ignored, and Python then never turns SIGINT into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "virtex.run", *args], cwd=REPO,
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_as_in_a_terminal)


def _wait_for(predicate, timeout: float = 300, every: float = 0.002) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> list[tuple[int, float]]:
    args, env = tiny
    run = tmp_path_factory.mktemp("reference") / "run"
    res = run_cli(*args, "--run_dir", str(run), env=env)
    assert res.returncode == 0, res.stderr
    assert not (run / ".lock").exists() and not _temporaries(run)
    return _losses(run)


def test_a_second_start_on_a_held_run_dir_is_one_error(tiny, tmp_path):
    args, env = tiny
    run = tmp_path / "run"
    first = _start([*args, "--gin_param", "trainer.max_steps=500", "--run_dir", str(run)], env)
    try:
        assert _wait_for(lambda: (run / "metrics.jsonl").is_file(), every=0.1)
        res = run_cli(*args, "--gin_param", "trainer.max_steps=500", "--run_dir", str(run), env=env)
        assert res.returncode == 2
        line = _error_line(res)
        assert line.startswith(f"virtex: error: run directory {run} is in use by pid "
                               f"{first.pid} on host {socket.gethostname()} since ")
        assert line.endswith("wait for it to finish, or choose another --run_dir")
    finally:
        first.kill()
        first.wait()
    # kill -9 leaves the lock behind, naming the dead holder (the next test takes one over)
    assert json.loads((run / ".lock").read_text())["pid"] == first.pid


def test_a_dead_holders_lock_is_taken_over(tiny, reference, tmp_path):
    args, env = tiny
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    holder = {"host": socket.gethostname(), "pid": int(dead), "slurm_job": None, "since": 0}
    (run / ".lock").write_text(json.dumps(holder))
    res = run_cli(*args, "--run_dir", str(run), env=env)
    assert res.returncode == 0, res.stderr
    assert not (run / ".lock").exists()
    assert _losses(run) == reference


def test_another_config_in_the_same_run_dir_is_one_error(tiny, reference, tmp_path):
    args, env = tiny
    run = tmp_path / "run"
    assert run_cli(*args, "--run_dir", str(run), env=env).returncode == 0
    config = (run / "config.gin").read_text()
    res = run_cli(*args, "--run_dir", str(run), "--gin_param", "trainer.lr=0.5", env=env)
    assert res.returncode == 2
    line = _error_line(res)
    assert line.startswith(f"virtex: error: run directory {run} holds a run of another config "
                           "(was `trainer.lr = 0.001`; now `trainer.lr = 0.5`)")
    assert "or start fresh with another --run_dir" in line
    assert (run / "config.gin").read_text() == config
    assert _losses(run) == reference  # nothing trained, nothing logged
    # The same config resumes (here: finds the run finished); more steps train on.
    res = run_cli(*args, "--run_dir", str(run), env=env)
    assert res.returncode == 0 and "training already finished" in res.stdout
    res = run_cli(*args, "--run_dir", str(run), "--gin_param", "trainer.max_steps=4", env=env)
    assert res.returncode == 0 and "resumed from" in res.stdout
    assert [step for step, _ in _losses(run)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_then_resume(tiny, reference, tmp_path):
    """SIGKILL while a checkpoint is being written, five times: each kill leaves a
    temporary that the next start removes; the finished run equals an uninterrupted one."""
    args, env = tiny
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    left_behind = 0
    for _ in range(5):
        proc = _start([*args, "--run_dir", str(run)], env)
        mine = f"*~{proc.pid}.tmp"  # this writer's temporary (see virtex.io)

        def writing(proc=proc, mine=mine) -> bool:
            return bool(list(ckpts.glob(mine))) or proc.poll() is not None

        assert _wait_for(writing)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left_behind += bool(list(ckpts.glob(mine)))
        for path in list_checkpoints(ckpts):  # every complete checkpoint loads
            torch.load(path, weights_only=True)
    assert left_behind >= 3  # the kills did land inside checkpoint writes
    res = run_cli(*args, "--run_dir", str(run), env=env)
    assert res.returncode == 0, res.stderr
    assert not _temporaries(run) and not (run / ".lock").exists()
    assert _losses(run) == reference  # bitwise, and each step logged once


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_and_the_run_resumes(tiny, tmp_path):
    # 20 steps, so that the interrupt lands mid-run even on a loaded machine (with 3 the
    # run could end before the signal was delivered, and exit 0)
    args, env = tiny
    args = [*args, "--gin_param", "trainer.max_steps=20"]
    whole = tmp_path / "whole"
    assert run_cli(*args, "--run_dir", str(whole), env=env).returncode == 0
    reference = _losses(whole)
    run = tmp_path / "run"
    proc = _start([*args, "--run_dir", str(run)], env)
    assert _wait_for(lambda: bool(list((run / "checkpoints").glob("*"))), every=0.001)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "virtex: interrupted"
    assert not _temporaries(run) and not (run / ".lock").exists()
    res = run_cli(*args, "--run_dir", str(run), env=env)
    assert res.returncode == 0, res.stderr
    assert _losses(run) == reference


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) for a small tmpfs (run the tests as root)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def tmpfs(tmp_path):
    mounts: list[Path] = []

    def mount(where: Path, size: str) -> Path:
        _mount_tmpfs(where, size)
        mounts.append(where)
        return where

    yield mount
    for where in reversed(mounts):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.slow
def test_disk_full_is_one_line_and_earlier_checkpoints_stay(tiny, tmp_path, tmpfs):
    args, env = tiny
    probe = tmp_path / "probe"
    assert run_cli(*args, "--run_dir", str(probe), "--gin_param", "trainer.max_steps=1",
                   env=env).returncode == 0
    size = list_checkpoints(probe / "checkpoints")[0].stat().st_size
    run = tmp_path / "run"
    tmpfs(run / "checkpoints", f"{int(size * 1.5)}")  # room for one checkpoint, not two
    res = run_cli(*args, "--run_dir", str(run), env=env)
    assert res.returncode == 2
    line = _error_line(res)
    assert line == (f"virtex: error: cannot write {run / 'checkpoints' / 'step_0000002.pt'}: "
                    "no space left on device")
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_0000001.pt"]
    assert torch.load(run / "checkpoints" / "step_0000001.pt", weights_only=True)["step"] == 1
    assert not _temporaries(run) and not (run / ".lock").exists()


@pytest.mark.slow
def test_read_only_run_dir_is_one_line(tiny, tmp_path, tmpfs):
    args, env = tiny
    run = tmpfs(tmp_path / "run", "512m")
    assert run_cli(*args, "--run_dir", str(run), "--gin_param", "trainer.max_steps=1",
                   env=env).returncode == 0
    before = sorted(p.name for p in list_checkpoints(run / "checkpoints"))
    remount = subprocess.run(["mount", "-o", "remount,ro", str(run)], capture_output=True,
                             text=True)
    if remount.returncode:
        pytest.skip(f"cannot remount read-only: {remount.stderr.strip()}")
    res = run_cli(*args, "--run_dir", str(run), "--gin_param", "trainer.max_steps=1", env=env)
    assert res.returncode == 2
    assert _error_line(res) == f"virtex: error: cannot write {run / '.lock'}: read-only file system"
    assert sorted(p.name for p in list_checkpoints(run / "checkpoints")) == before


def test_an_error_in_a_loader_worker_names_the_file(tiny, shapes_root, tmp_path):
    args, env = tiny
    coco = tmp_path / "coco"
    shutil.copytree(shapes_root / "coco", coco)
    victim = sorted((coco / "train2017").glob("*.jpg"))[0]
    victim.write_bytes(b"not a JPEG at all")
    args = [a.replace(str(shapes_root / "coco"), str(coco)) for a in args]
    res = run_cli(*args, "--run_dir", str(tmp_path / "run"), "--gin_param",
                  "trainer.num_workers=1", "--gin_param", "batch_size=48", env=env)
    assert res.returncode == 2
    line = _error_line(res)
    assert line.startswith(f"virtex: error: cannot read image {victim}")
    assert "DataLoader worker" not in line


@pytest.mark.parametrize("extra, message", [
    (["--gpus", "-2"], "--gpus -2: expected a number >= 1"),
    (["--nodes", "0"], "--nodes 0: expected a number >= 1"),
])
def test_bad_launch_flags(tiny, tmp_path, extra, message):
    args, env = tiny
    res = run_cli(*args, *extra, "--run_dir", str(tmp_path / "run"), env=env)
    assert res.returncode == 2 and _error_line(res) == f"virtex: error: {message}"
    assert not (tmp_path / "run").exists()


def test_an_empty_spec_is_one_error(tmp_path):
    spec = tmp_path / "empty.gin"
    spec.write_text("# nothing here\n")
    res = run_cli(str(spec), "--run_dir", str(tmp_path / "run"), cwd=tmp_path)
    assert res.returncode == 2
    assert _error_line(res) == (f"virtex: error: spec {spec} runs nothing: it binds no "
                                "experiment (experiment.task to pretrain, experiment.evaluators "
                                "to evaluate) and no pipeline")
    assert not (tmp_path / "run").exists()


def test_slurm_without_srun_is_one_error(tiny, tmp_path):
    """A machine with sbatch but no srun (not a SLURM login node): one error, nothing submitted."""
    args, env = tiny
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "submitted"
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"#!/bin/sh\ntouch {marker}\necho 'Submitted batch job 1'\n")
    sbatch.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), "/usr/bin", "/bin"])
    path = os.pathsep.join(p for p in path.split(os.pathsep)
                           if p == str(bin_dir) or not (Path(p) / "srun").exists())
    res = run_cli(*args, "--launcher", "slurm", "--run_dir", str(tmp_path / "run"),
                  env={**env, "PATH": path})
    assert res.returncode == 2
    assert _error_line(res).startswith("virtex: error: srun not found: the slurm launcher runs "
                                       "on a SLURM cluster's login node")
    assert not marker.exists()


@pytest.mark.parametrize("binding, message", [
    ("trainer.max_steps='ten'", "trainer.max_steps = 'ten': expected an int"),
    ("trainer.max_steps=0", "trainer.max_steps = 0: expected an int >= 1"),
    ("batch_size='8'", "trainer.batch_size = '8': expected an int"),
    ("batch_size=-4", "trainer.batch_size = -4: expected an int >= 1"),
    ("trainer.checkpoint_every=0", "trainer.checkpoint_every = 0: expected an int >= 1"),
    ("trainer.optimizer='adam'", "trainer.optimizer = 'adam': expected one of 'sgd', 'adamw'"),
    ("trainer.lr=-0.1", "trainer.lr = -0.1: expected a number >= 0"),
    ("tokenizer.vocab_size=3", "tokenizer.vocab_size = 3: expected an int >= 5"),
    ("image_size=0", "transforms.train.size = 0: expected an int >= 1"),
])
def test_a_bad_value_is_one_line_naming_the_binding(tiny, tmp_path, binding, message):
    args, env = tiny
    res = run_cli(*args, "--gin_param", binding, "--run_dir", str(tmp_path / "run"), env=env)
    assert res.returncode == 2
    assert _error_line(res) == f"virtex: error: {message}"
    assert not list_checkpoints(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
def test_batch_not_divisible_by_the_processes(tiny, tmp_path):
    args, env = tiny
    res = run_cli(*args, "--gpus", "3", "--run_dir", str(tmp_path / "run"), env=env)
    assert res.returncode != 0
    assert ("trainer.batch_size = 4 is not divisible by the 3 processes of this run"
            in res.stderr)
