"""The plan layer (virtex.plan, virtex.pipeline): what one command expands into, the sweep
collector's one format, choosing the best checkpoint, and the pipeline's stages."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from virtex.errors import UserError
from virtex.experiment import expand, prepare
from virtex.pipeline import checkpoint_steps, stage_binding
from virtex.plan import collect, parse_sweep, select, split_values
from virtex.run import main


def _members(tmp_path: Path, values: dict[int, float]) -> list[list]:
    members = []
    for step, value in values.items():
        run = tmp_path / f"step_{step:07d}"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"voc07/mAP": value, "voc07/AP/cat": 1.0}))
        members.append([run.name, str(run), {"step": step, "checkpoint": f"/c/step_{step:07d}.pt"}])
    return members


def _curve(directory: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(directory))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_sweep_values_split_at_top_level_commas_only():
    assert split_values("0.1,0.2") == ["0.1", "0.2"]
    assert split_values("[1,2],[3]") == ["[1,2]", "[3]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert split_values("[1,2") is None
    assert parse_sweep("trainer.lr=0.1,0.2") == ("trainer.lr", ["0.1", "0.2"])
    with pytest.raises(UserError, match="expected NAME=V1,V2"):
        parse_sweep("trainer.lr")


def test_collect_waits_for_every_member_then_writes_one_format(tmp_path):
    members = _members(tmp_path / "sweep", {2: 10.0, 4: 30.0})
    late = tmp_path / "sweep" / "step_0000006"
    members.append([late.name, str(late), {"step": 6, "checkpoint": "/c/step_0000006.pt"}])
    assert collect(str(tmp_path / "sweep"), members) is False
    assert not (tmp_path / "sweep" / "sweep.csv").exists()
    late.mkdir()
    (late / "metrics.json").write_text(json.dumps({"voc07/mAP": 20.0, "voc07/AP/cat": 1.0}))
    board = tmp_path / "pretrain" / "tensorboard"
    assert collect(str(tmp_path / "sweep"), members, str(board)) is True
    with open(tmp_path / "sweep" / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["run", "step", "checkpoint", "voc07/mAP", "voc07/AP/cat"]
    assert [(r["run"], r["step"], r["voc07/mAP"]) for r in rows] == [
        ("step_0000002", "2", "10.0"), ("step_0000004", "4", "30.0"), ("step_0000006", "6", "20.0")]
    summary = (tmp_path / "sweep" / "summary.md").read_text().splitlines()
    assert summary[0] == "| run | step | voc07/mAP |"  # headline metrics only
    assert "| step_0000004 | 4 | 30.0000 |" in summary
    # the curve, into the given tensorboard directory; collecting again replaces it
    assert _curve(board, "voc07/mAP") == [(2, 10.0), (4, 30.0), (6, 20.0)]
    assert collect(str(tmp_path / "sweep"), members, str(board)) is True
    assert _curve(board, "voc07/mAP") == [(2, 10.0), (4, 30.0), (6, 20.0)]
    assert len(list(board.iterdir())) == 1


def _sweep_csv(path: Path, rows: list[tuple[int, float]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["run,step,checkpoint,voc07/mAP"]
    for step, value in rows:
        target = path.parent / "ckpts" / f"step_{step:07d}.pt"
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(b"x")
        lines.append(f"step_{step:07d},{step},{target},{value}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_best_checkpoint_is_the_highest_metric_ties_to_the_later_step(tmp_path):
    sweep = _sweep_csv(tmp_path / "voc07" / "sweep.csv", [(2, 10.0), (4, 30.0), (6, 30.0), (8, 5.0)])
    choice = select(str(sweep), "voc07/mAP", str(tmp_path))
    assert (choice["step"], choice["value"]) == (6, 30.0)
    link = tmp_path / "best.pt"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))  # the tree can move
    assert link.resolve() == (tmp_path / "voc07" / "ckpts" / "step_0000006.pt").resolve()
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 6
    assert select(str(sweep), "voc07/mAP", str(tmp_path), steps=[None, 4])["step"] == 4
    assert select(str(sweep), "voc07/mAP", str(tmp_path), steps=[7, None])["step"] == 8
    assert link.resolve().name == "step_0000008.pt"  # replaced, never two links
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("metric, steps, needle", [
    ("voc07/mAp", None, "has no column 'voc07/mAp'"),
    ("voc07/mAP", [100, 200], "no row of"),
])
def test_a_choice_that_cannot_be_made_is_one_error(tmp_path, metric, steps, needle):
    sweep = _sweep_csv(tmp_path / "voc07" / "sweep.csv", [(2, 10.0)])
    with pytest.raises(UserError, match=needle):
        select(str(sweep), metric, str(tmp_path), steps=steps)
    with pytest.raises(UserError, match="the checkpoint sweep has not finished"):
        select(str(tmp_path / "nowhere.csv"), metric, str(tmp_path))


def test_the_sweep_evaluates_every_kept_checkpoint_and_the_last():
    assert checkpoint_steps(200, 600, 1) == [200, 400, 600]
    assert checkpoint_steps(2000, 500_000, 5)[:2] == [10_000, 20_000]
    assert checkpoint_steps(200, 500, 1) == [200, 400, 500]


def test_stage_bindings_are_recognised_and_urls_are_not():
    assert stage_binding("pretrain:trainer.max_steps=20") == "pretrain"
    assert stage_binding("trainer.max_steps=20") is None
    assert stage_binding("ckpt=http://host/x.pt") is None
    assert stage_binding("ckpt=zoo:bicaptioning_R_50_L1_H2048") is None


def _plan(tmp_path, *params):
    job = prepare("pipeline/quickstart", list(params), str(tmp_path / "pipe"))
    return expand(job)


def test_the_quickstart_pipeline_expands_into_its_stages(tmp_path):
    plan = _plan(tmp_path, "pretrain:trainer.max_steps=30", "pretrain:trainer.checkpoint_every=10",
                 "imagenet:epochs=1")
    root = tmp_path / "pipe"
    assert plan.kind == "pipeline" and plan.run_dir == str(root)
    assert [s.name for s in plan.steps] == [
        "pretrain", "voc07/step_0000010", "voc07/step_0000020", "voc07/step_0000030",
        "imagenet", "inat", "coco", "lvis", "voc_det", "captioning"]
    pretrain, *rest = plan.steps
    assert pretrain.job.run_dir == str(root / "pretrain")
    assert pretrain.job.params[-3:] == ["trainer.max_steps=30", "trainer.checkpoint_every=10",
                                        "trainer.keep_every=10"]  # every swept checkpoint is kept
    sweep = [s for s in rest if s.group == "voc07"]
    for s, step in zip(sweep, (10, 20, 30)):
        ckpt = root / "pretrain" / "checkpoints" / f"step_{step:07d}.pt"
        assert s.job.params[-1] == f"ckpt='{ckpt}'" and s.starts_after == ["pretrain"]
        assert s.before[0].name == "wait_for" and s.before[0].args["path"] == str(ckpt)
        assert [a.name for a in s.then] == ["collect", "report"]
        assert s.then[0].args["curve_dir"] == str(root / "pretrain" / "tensorboard")
    downstream = [s for s in rest if s.group != "voc07"]
    for s in downstream:
        assert s.after == ["voc07"] and [a.name for a in s.before] == ["select"]
        assert s.job.params[-1] == f"ckpt='{root / 'best.pt'}'"
        assert s.job.run_dir == str(root / s.name)
    imagenet = next(s for s in downstream if s.name == "imagenet")
    assert imagenet.job.params[-2] == "epochs=1"  # its own binding, after the spec's
    assert "shapes_dir.images = 2000" in imagenet.job.params  # pipeline.common


@pytest.mark.parametrize("params, needle", [
    (["pretrian:trainer.max_steps=3"], "unknown stage 'pretrian'"),
    (["pipeline.sweep_every=0"], "pipeline.sweep_every = 0: expected an integer >= 1"),
    (["pipeline.params={'imagenett': []}"], "pipeline.params: unknown stage 'imagenett'"),
    (["imagenet:epochs_=1"], "epochs_"),
])
def test_a_bad_pipeline_binding_is_one_error(tmp_path, params, needle):
    with pytest.raises(UserError, match=needle):
        _plan(tmp_path, *params)


def test_a_stage_whose_spec_runs_nothing_is_one_error(tmp_path):
    empty = tmp_path / "empty.gin"
    empty.write_text("ckpt = None\nshapes_dir.images = 10\n")  # takes ckpt, runs nothing
    with pytest.raises(UserError, match=f"pipeline step 'x': spec {empty} runs nothing"):
        _plan(tmp_path, f"pipeline.downstream={{'x': '{empty}'}}", "pipeline.params={}")


def test_a_stage_binding_on_a_plain_spec_is_one_error(tmp_path, capsys):
    rc = main(["quickstart", "--gin_param", "pretrain:trainer.max_steps=3", "--print_config"])
    err = capsys.readouterr().err
    assert rc == 2 and "a STAGE:NAME=VALUE binding is for a pipeline spec's stage" in err


def test_print_sbatch_shows_every_stage_with_its_dependencies(tmp_path, capsys):
    rc = main(["pipeline/quickstart", "--launcher", "slurm", "--print_sbatch", "--run_dir",
               str(tmp_path / "pipe"), "--gin_param", "pipeline.resources={'pretrain': "
               "{'gpus': 8, 'time': '72:00:00'}, 'voc07': {'array_parallelism': 1}}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    blocks = out.split("# -- ")[1:]
    assert [b.split()[0] for b in blocks] == ["pretrain", "voc07", "imagenet", "inat", "coco",
                                              "lvis", "voc_det", "captioning"]
    assert "#SBATCH --gpus-per-node=8" in blocks[0] and "#SBATCH --time=4320" in blocks[0]
    assert "(dependency after:<pretrain>)" in blocks[1] and "#SBATCH --array=0-2%1" in blocks[1]
    assert all("(dependency afterok:<voc07>)" in b for b in blocks[2:])
    assert "#SBATCH --gpus-per-node" not in blocks[2]  # a stage's resources are its own
    assert not (tmp_path / "pipe").exists()  # nothing submitted, nothing written
