"""The SLURM launcher against a real SLURM (CI starts one with ``bash .ci/slurm.sh start``).

Without a SLURM that answers ``sinfo`` the tests that submit jobs are skipped (a failure under
``VIRTEX_TEST_REQUIRE=all``, as in CI; see conftest.py).
Job state is read with ``squeue`` (the test cluster keeps no accounting database).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cli import make_distribution, run_cli, tiny_pretrain

from virtex.run import main
from virtex.tools.make_shapes import generate

# a test-only plugin: an evaluator whose metric is known from the checkpoint it evaluates
NORM_PLUGIN = '''
import virtex
from virtex.evaluation.api import EvalResult

class WeightNorm:
    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, request):
        total = sum(float(p.detach().double().pow(2).sum())
                    for p in request.backbone.parameters())
        return EvalResult({"weights/l2": total * self.scale})

@virtex.hookimpl
def virtex_evaluators():
    return {"weight_norm": WeightNorm}
'''

NORM_SPEC = """
ckpt = %gin.REQUIRED
experiment.backbone = @backbones.resnet18
experiment.ckpt = %ckpt
experiment.evaluators = [@evaluators.weight_norm()]
"""


# the tests that submit jobs: skipped without SLURM (failed under VIRTEX_TEST_REQUIRE=all)
SLURM = pytest.mark.requires("sinfo", how="`bash .ci/slurm.sh start` installs and starts a "
                                          "one-node SLURM on this machine")


# -- helpers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def partition(unavailable) -> str:
    """The default partition of the running SLURM; without one, skipped (or failed where
    SLURM is required) by conftest's ``unavailable``."""
    hint = "`bash .ci/slurm.sh start` installs and starts a one-node SLURM on this machine"
    if shutil.which("sinfo") is None:
        unavailable("sinfo", f"SLURM is not installed ('sinfo' is not on PATH); {hint}")
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%P|%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        unavailable("sinfo", f"SLURM does not answer ({exc}); {hint}")
    rows = [line.split("|") for line in res.stdout.split()]
    if res.returncode != 0 or not any(state in ("idle", "mixed", "allocated") for _, state in rows):
        unavailable("sinfo", f"SLURM does not answer (sinfo: "
                             f"{(res.stderr or res.stdout).strip()!r}); {hint}")
    return next((p for p, _ in rows if p.endswith("*")), rows[0][0]).rstrip("*")


@pytest.fixture
def jobs():
    """Job ids a test submitted: cancelled at teardown if the test left them running."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        subprocess.run(["scancel", job_id], capture_output=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shapes_root):
    return tiny_pretrain(tmp_path_factory.mktemp("slurm_spec"), shapes_root / "coco", max_steps=4,
                         warmup_steps=2, checkpoint_every=2, log_every=1, cpu_threads=1)


def _gin(*params: str) -> list[str]:
    return [a for p in params for a in ("--gin_param", p)]


def _job_id(run_dir: Path) -> str:
    return json.loads((run_dir / "slurm" / "job.json").read_text())["job_id"]


def _state(job_id: str) -> str:
    res = subprocess.run(["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"],
                         capture_output=True, text=True)
    return res.stdout.strip()


def _logs(run_dir: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}"
                     for p in sorted((run_dir / "slurm").glob("*_log.*")))


def _wait(condition, what: str, run_dir: Path, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{_logs(run_dir)}")
        time.sleep(0.1)


def _losses(run_dir: Path) -> dict[int, float]:
    """Last logged total loss at every step (a resumed run re-logs redone steps)."""
    out: dict[int, float] = {}
    path = run_dir / "metrics.jsonl"
    for line in (path.read_text().splitlines() if path.is_file() else []):
        row = json.loads(line)
        if "loss/total" in row:
            out[row["step"]] = row["loss/total"]
    return out


def _log_count(run_dir: Path, needle: str) -> int:
    path = run_dir / "log.txt"
    return path.read_text().count(needle) if path.is_file() else 0


def _submit_reference_and_run(common: list[str], tmp_path: Path,
                              jobs: list[str]) -> tuple[Path, Path, str, str]:
    """Submit the same run twice, at once (the test node has a CPU for each): an
    uninterrupted reference and the one a test pre-empts. Their dirs and job ids."""
    env = {"VIRTEX_CACHE": str(tmp_path / "cache")}
    ref, run = tmp_path / "reference", tmp_path / "preempted"
    for d in (ref, run):
        res = run_cli(*common, "--run_dir", str(d), env=env)
        assert res.returncode == 0, res.stderr
        assert "submitted SLURM job" in res.stdout and "state: squeue -j" in res.stdout
        jobs.append(_job_id(d))
    return ref, run, _job_id(ref), _job_id(run)


def _preempt_after(run: Path, job_id: str, step: int) -> int:
    """Pre-empt ``job_id`` once it has logged ``step``; the step it checkpointed at."""
    _wait(lambda: max(_losses(run), default=0) >= step, f"step {step}", run)
    _signal(job_id)
    _wait(lambda: _log_count(run, "stop requested") == 1, "the checkpoint at the signal", run)
    return int((run / "log.txt").read_text().split("checkpoint saved at step ")[1].split()[0])


def _signal(job_id: str) -> None:
    """What SLURM does on pre-emption (and submitit's job._interrupt()): TERM, then USR2."""
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)


# -- without a cluster --------------------------------------------------------------------------
def test_print_sbatch_shows_the_script_and_submits_nothing(tiny, tmp_path, monkeypatch, capsys):
    spec, params = tiny
    config = tmp_path / "slurm.toml"
    config.write_text('partition = "lab"\naccount = "vision"\ntime = "2:00:00"\nqos = "normal"\n'
                      'setup = ["module load cuda"]\n[sbatch]\nmail-type = "END"\n')
    monkeypatch.setenv("VIRTEX_SLURM_CONFIG", str(config))
    run_dir = tmp_path / "run"
    assert main([str(spec), *params, "--launcher", "slurm", "--gpus", "8", "--nodes", "2",
                 "--run_dir", str(run_dir),
                 "--slurm_partition", "gpu", "--slurm_time", "72:00:00", "--slurm_constraint", "a100",
                 "--print_sbatch"]) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=4320", "#SBATCH --account=vision",
                 "#SBATCH --qos=normal", "#SBATCH --constraint=a100", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --ntasks-per-node=8", "#SBATCH --nodes=2", "#SBATCH --mail-type=END",
                 f"#SBATCH --output={run_dir}/slurm/%j_0_log.out", "#SBATCH --signal=USR2@120",
                 "module load cuda"):
        assert line in script.splitlines(), (line, script)
    assert "srun" in script and "submitit.core._submit" in script and "#SBATCH --array" not in script
    assert not run_dir.exists()  # nothing submitted, nothing written

    # launcher flags before the spec: a flag's value is never taken for the spec
    assert main(["--slurm_time", "90", "--launcher", "slurm", "--sweep", "trainer.lr=0.1,0.2",
                 str(spec), *params, "--run_dir", str(run_dir), "--print_sbatch"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "#SBATCH --array=0-1%2" in lines and "#SBATCH --partition=lab" in lines
    assert "#SBATCH --time=90" in lines and not any("gpus" in x for x in lines)  # CPU: one task
    assert f"# array task 1: trainer.lr=0.2 -> {run_dir}/trainer.lr=0.2" in lines
    assert not run_dir.exists()


@pytest.mark.parametrize("args, config, needles", [
    (["--slurm_time", "3days"], None, ["--slurm_time '3days'", "72:00:00"]),
    (["--slurm_partiton", "gpu"], None, ["unrecognized arguments: --slurm_partiton gpu"]),
    (["--sweep", "trainer.lr"], None, ["--sweep 'trainer.lr'", "NAME=V1,V2"]),
    (["--sweep", "trainer.lr=0.1,[0.2"], None, ["--sweep 'trainer.lr=0.1,[0.2'", "balanced"]),
    (["--sweep", "trainer.lrr=0.1,0.2"], None, ["trainer.lrr"]),
    ([], 'partiton = "gpu"\n', ["slurm.toml: unknown key 'partiton'"]),
    ([], "cpus_per_task = \"ten\"\n", ["slurm.toml: cpus_per_task = 'ten': expected an integer"]),
    ([], 'time = "forever"\n', ["slurm.toml: time 'forever'"]),
    ([], "partition = \n", ["slurm.toml: not valid TOML"]),
])
def test_bad_options_are_one_clear_error(tiny, tmp_path, monkeypatch, capsys, args, config, needles):
    spec, params = tiny
    if config is not None:
        (tmp_path / "slurm.toml").write_text(config)
        monkeypatch.setenv("VIRTEX_SLURM_CONFIG", str(tmp_path / "slurm.toml"))
    rc = main([str(spec), *params, "--launcher", "slurm", "--run_dir", str(tmp_path / "run"),
               "--print_sbatch", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("virtex: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- on the cluster -------------------------------------------------------------------------------
@pytest.mark.slow
@SLURM
def test_a_run_completes_under_slurm_and_wait_prints_its_summary(partition, tiny, tmp_path, jobs):
    spec, params = tiny
    run_dir = tmp_path / "run"
    res = run_cli(str(spec), *params, "--launcher", "slurm", "--slurm_partition", partition,
                  "--slurm_time", "10", "--run_dir", str(run_dir), "--wait",
                  env={"VIRTEX_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert res.returncode == 0, (res.stdout, res.stderr, _logs(run_dir) if run_dir.exists() else "")
    job_id = _job_id(run_dir)
    jobs.append(job_id)
    out = res.stdout
    assert f"submitted SLURM job {job_id}" in out and f"{run_dir}/slurm/{job_id}_0_log" in out
    assert "step 4/4" in out  # --wait followed the job's log
    assert f"SLURM job {job_id}: COMPLETED" in out
    assert "| train/seconds" in out  # the summary, printed at the end
    assert _state(job_id) == "COMPLETED"
    record = json.loads((run_dir / "slurm" / "job.json").read_text())
    assert record["tasks"] == [{"job_id": job_id, "label": "", "run_dir": str(run_dir)}]
    sbatch = Path(record["sbatch"]).read_text()
    assert f"#SBATCH --partition={partition}" in sbatch and "#SBATCH --time=10" in sbatch
    assert "step 4/4" in (run_dir / "slurm" / f"{job_id}_0_log.out").read_text()
    assert sorted(_losses(run_dir)) == [1, 2, 3, 4]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/seconds"] > 0
    assert "1 process(es)" in (run_dir / "log.txt").read_text()

    # the same command without --wait: returns once submitted (no stale summary printed);
    # the job finds the finished run and does not train again
    res = run_cli(str(spec), *params, "--launcher", "slurm", "--slurm_partition", partition,
                  "--run_dir", str(run_dir), env={"VIRTEX_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    again = _job_id(run_dir)
    jobs.append(again)
    assert again != job_id and f"submitted SLURM job {again}" in res.stdout
    assert f"state: squeue -j {again}" in res.stdout and "train/seconds" not in res.stdout
    _wait(lambda: _state(again) == "COMPLETED", "the second job", run_dir)
    assert "training already finished (4 steps)" in (run_dir / "log.txt").read_text()
    assert sorted(_losses(run_dir)) == [1, 2, 3, 4]


@SLURM
def test_a_failing_job_ends_wait_with_one_error_line(partition, tiny, tmp_path, jobs):
    spec, params = tiny
    run_dir = tmp_path / "run"
    res = run_cli(str(spec), *params, "--gin_param", f"data_root={tmp_path / 'missing'}",
                  "--launcher", "slurm", "--run_dir", str(run_dir), "--wait",
                  env={"VIRTEX_CACHE": str(tmp_path / "cache")}, timeout=300)
    job_id = _job_id(run_dir)
    jobs.append(job_id)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert f"SLURM job {job_id}: FAILED" in res.stdout
    assert "Traceback" not in res.stdout + res.stderr  # the traceback stays in the job's log
    err = run_dir / "slurm" / f"{job_id}_0_log.err"
    assert "Traceback" in err.read_text()
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"virtex: error: SLURM job {job_id} FAILED: DataFormatError: annotations "
                           f"file not found: {tmp_path / 'missing'}/annotations/captions_train2017.json")
    assert last.endswith(f"(log: {err})")


@pytest.mark.slow
@SLURM
def test_preempted_job_checkpoints_requeues_and_resumes_exactly(partition, tiny, tmp_path, jobs):
    """Two pre-emptions of one job: the first resumes from the checkpoint written at the signal;
    before the second restart that checkpoint is corrupted and the job falls back to the one
    before. The loss at every step and the final metrics equal an uninterrupted run's."""
    spec, params = tiny
    common = [str(spec), *params, *_gin("trainer.max_steps=50", "trainer.checkpoint_every=10",
                                        "trainer.num_workers=1"),
              "--launcher", "slurm", "--slurm_partition", partition]
    ref, run, ref_id, job_id = _submit_reference_and_run(common, tmp_path, jobs)

    # 1st pre-emption, mid-run: a checkpoint at the signal's step, requeue, resume from it
    first = _preempt_after(run, job_id, 13)
    assert 13 <= first < 40, first
    _wait(lambda: _log_count(run, "resumed from") == 1, "the requeued job", run)
    assert f"resumed from {run}/checkpoints/step_{first:07d}.pt at step {first}" in (run / "log.txt").read_text()

    # 2nd pre-emption; the newest checkpoint is corrupted before the job can start again
    _wait(lambda: max(_losses(run)) >= first + 4, f"step {first + 4}", run)
    subprocess.run(["scontrol", "update", f"PartitionName={partition}", "State=DOWN"], check=True)
    try:
        _signal(job_id)
        _wait(lambda: _log_count(run, "stop requested") == 2, "the second checkpoint", run)
        second = int((run / "log.txt").read_text().split("checkpoint saved at step ")[2].split()[0])
        _wait(lambda: _state(job_id) == "PENDING", "the requeued job to be pending", run)
        newest = run / "checkpoints" / f"step_{second:07d}.pt"
        newest.write_bytes(newest.read_bytes()[:1000])  # half-written
    finally:
        subprocess.run(["scontrol", "update", f"PartitionName={partition}", "State=UP"], check=True)
    previous = max(s for s in (first, 10, 20, 30, 40) if s < second)
    _wait(lambda: _state(job_id) == "COMPLETED", "the job to finish", run)
    _wait(lambda: _state(ref_id) == "COMPLETED", "the reference job to finish", ref)

    err = (run / "slurm" / f"{job_id}_0_log.err").read_text()
    assert f"step_{second:07d}.pt' is unreadable" in err and "falling back to the previous checkpoint" in err
    log = (run / "log.txt").read_text()
    assert f"resumed from {run}/checkpoints/step_{previous:07d}.pt at step {previous}" in log
    scontrol = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    assert "Restarts=2" in scontrol  # one SLURM job, requeued twice
    expected = _losses(ref)
    assert sorted(expected) == list(range(1, 51))
    assert _losses(run) == expected  # bitwise, every step
    final = {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k != "train/seconds"}
    assert final == {k: v for k, v in json.loads((ref / "metrics.json").read_text()).items()
                     if k != "train/seconds"}


@pytest.mark.slow
@SLURM
def test_a_preempted_shard_run_requeues_and_resumes_bitwise_mid_epoch(partition, tmp_path, jobs):
    """Pretraining from caption shards with 2 loader workers (2 streams, each with its own
    position): pre-empted mid-epoch, the requeued job resumes every stream at its exact next
    sample, so the loss at every step equals an uninterrupted run's bitwise."""
    # 100 scenes: 80 train images in 8 shards of 10; each stream reads 4 shards an epoch,
    # 10 batches of 4, and gives every other step's batch: an epoch is 20 steps
    root = generate(tmp_path / "shapes", images=100, seed=0, formats=("coco", "shards"))
    spec, params = tiny_pretrain(tmp_path, root / "coco", batch_size=4, max_steps=50,
                                 warmup_steps=2, checkpoint_every=15, log_every=1,
                                 num_workers=2, cpu_threads=1)
    with open(spec, "a") as f:
        f.write("trainer.dataset = @datasets.caption_shards()\n"
                "datasets.caption_shards.tokenizer = @tokenizer()\n"
                "datasets.caption_shards.transform = @transforms.train()\n"
                "datasets.caption_shards.shuffle_buffer = 4\n"
                f"datasets.caption_shards.shards = '{root}/shards/train-{{00000..00007}}.tar'\n")
    common = [str(spec), *params, "--launcher", "slurm", "--slurm_partition", partition]
    ref, run, ref_id, job_id = _submit_reference_and_run(common, tmp_path, jobs)

    at = _preempt_after(run, job_id, 7)
    assert 7 <= at < 50, at
    state = torch.load(run / "checkpoints" / f"step_{at:07d}.pt", weights_only=True)
    positions = [p for d in state["data"] for p in d["positions"].values()]
    assert len(positions) == 2  # both workers' streams are saved
    assert any(s["shard"] or s["emitted"] for p in positions for s in p["sources"]), positions
    _wait(lambda: _log_count(run, "resumed from") == 1, "the requeued job", run)
    assert f"resumed from {run}/checkpoints/step_{at:07d}.pt at step {at}" in \
        (run / "log.txt").read_text()
    _wait(lambda: _state(job_id) == "COMPLETED", "the job to finish", run)
    _wait(lambda: _state(ref_id) == "COMPLETED", "the reference job to finish", ref)

    scontrol = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True,
                              text=True).stdout
    restarts = int(scontrol.split("Restarts=")[1].split()[0])
    assert restarts >= 1, scontrol
    expected = _losses(ref)
    assert sorted(expected) == list(range(1, 51))
    assert _losses(run) == expected  # bitwise, every step


@pytest.mark.slow
@SLURM
def test_checkpoint_directory_and_a_sweep_become_a_job_array(partition, tmp_path, jobs):
    """ckpt=DIR (2 checkpoints) x --sweep scale=1.0,3.0: a 4-task array, one run dir each."""
    import gin

    from virtex.checkpoint import save
    from virtex.registry import get_registry
    from virtex.weights import load_backbone_weights

    site = make_distribution(tmp_path / "site", "virtex_norm_test", {"virtex_norm_test": NORM_PLUGIN},
                             {"norm_test": "virtex_norm_test"})
    spec = tmp_path / "norm.gin"
    spec.write_text(NORM_SPEC)
    ckpts = tmp_path / "ckpts"
    expected = {}
    gin.clear_config()  # the job's spec binds nothing in resnet18: nor do these
    for step in (500, 1000):  # two "pretraining" checkpoints with different backbones
        torch.manual_seed(step)
        cnn = get_registry().get("backbones", "resnet18")().cnn.state_dict()
        path = save({"model": {f"visual.cnn.{k}": v for k, v in cnn.items()}}, ckpts, step)
        backbone = get_registry().get("backbones", "resnet18")()
        load_backbone_weights(backbone, path, "virtex")
        expected[step] = sum(float(p.detach().double().pow(2).sum()) for p in backbone.parameters())
    assert expected[500] != expected[1000]

    run_dir = tmp_path / "sweep"
    res = run_cli(str(spec), "--gin_param", f"ckpt={ckpts}", "--launcher", "slurm", "--run_dir",
                  str(run_dir), "--slurm_partition", partition, "--wait",
                  "--sweep", "evaluators.weight_norm.scale=1.0,3.0", pythonpath=[site],
                  env={"VIRTEX_CACHE": str(tmp_path / "cache")}, timeout=300)
    record = json.loads((run_dir / "slurm" / "job.json").read_text())
    jobs.append(record["job_id"])
    assert res.returncode == 0, (res.stdout, res.stderr, _logs(run_dir))
    job_id = record["job_id"]
    assert f"submitted SLURM job array {job_id} (4 tasks)" in res.stdout
    assert record["array"] and [t["job_id"] for t in record["tasks"]] == [f"{job_id}_{i}" for i in range(4)]
    cases = [(step, scale) for step in (500, 1000) for scale in ("1.0", "3.0")]
    for task, (step, scale) in zip(record["tasks"], cases):
        label = f"step_{step:07d},evaluators.weight_norm.scale={scale}"
        assert task["label"] == label and task["run_dir"] == str(run_dir / label)
        metrics = json.loads((Path(task["run_dir"]) / "metrics.json").read_text())
        assert metrics["weights/l2"] == pytest.approx(expected[step] * float(scale), rel=1e-9)
        assert f"SLURM job {task['job_id']}: COMPLETED" in res.stdout
        assert _state(task["job_id"]) == "COMPLETED"
    with open(run_dir / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["run", "step", "checkpoint", "evaluators.weight_norm.scale", "weights/l2"]
    assert [(r["step"], r["evaluators.weight_norm.scale"]) for r in rows] == [(str(a), b) for a, b in cases]
    assert [r["checkpoint"] for r in rows] == [str(ckpts / f"step_{a:07d}.pt") for a, _ in cases]
    summary = (run_dir / "summary.md").read_text()
    assert summary.splitlines()[0] == "| run | step | evaluators.weight_norm.scale | weights/l2 |"
    for step, scale in cases:
        row = (f"| step_{step:07d},evaluators.weight_norm.scale={scale} | {step} | {scale} | "
               f"{expected[step] * float(scale):.4f} |")
        assert row in summary.splitlines(), (row, summary)
    assert summary in res.stdout  # printed once every task finished


@pytest.mark.slow
@SLURM
def test_two_tasks_join_one_process_group_from_the_slurm_environment(partition, tiny, tmp_path, jobs,
                                                                    monkeypatch):
    """``--gpus 2`` on a CPU-only cluster (``request_gpus = false``): two SLURM tasks, gloo."""
    spec, params = tiny
    config = tmp_path / "slurm.toml"
    config.write_text("request_gpus = false\n")
    common = [str(spec), *params, *_gin("trainer.max_steps=2", "backbones.resnet18.frozen_bn=True",
                                        "textual_heads.transformer.dropout=0.0")]
    env = {"VIRTEX_CACHE": str(tmp_path / "cache"), "VIRTEX_SLURM_CONFIG": str(config)}
    two = tmp_path / "two"
    res = run_cli(*common, "--gpus", "2", "--launcher", "slurm", "--slurm_partition", partition,
                  "--run_dir", str(two), "--wait", env=env, timeout=300)
    jobs.append(_job_id(two))
    assert res.returncode == 0, (res.stdout, res.stderr, _logs(two))
    assert "1 node(s) x 2 task(s)" in res.stdout
    assert "2 process(es)" in (two / "log.txt").read_text()
    one = tmp_path / "one"  # the same in one local process
    monkeypatch.setenv("VIRTEX_CACHE", env["VIRTEX_CACHE"])
    threads = torch.get_num_threads()
    try:
        assert main([*common, "--run_dir", str(one)]) == 0
    finally:
        torch.set_num_threads(threads)
    l1, l2 = _losses(one), _losses(two)
    assert l1[1] == pytest.approx(l2[1], rel=1e-5, abs=1e-6)
    assert l1[2] == pytest.approx(l2[2], rel=1e-4)
