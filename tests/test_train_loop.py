"""The training loop's public parts: a data source through the contract, hooks, the
train state's checkpoint, the map-style source's order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from virtex.checkpoint import list_checkpoints
from virtex.context import Context, RunLogger
from virtex.data.source import DataSource, MapSource, StepBatchSampler
from virtex.engine import Preempted, Trainer, TrainState
from virtex.errors import UserError
from virtex.train_hooks import Hook, StopRequest, training_hooks

pytestmark = pytest.mark.usefixtures("one_thread")


class Regression(nn.Module):
    """A task with dropout: its loss depends on the restored RNG state too."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, object]:
        loss = (self.net(batch["x"]).squeeze(1) - batch["y"]).pow(2).mean()
        return {"loss": loss, "losses": {"mse": loss.detach()}}


class Stream:
    """A source whose position is its own (it ignores ``start_step``): only the saved
    ``data`` position lets a resumed run continue where it stopped."""

    def __init__(self, batch_size: int = 4):
        self.batch_size, self.position = batch_size, 0
        self.calls: list[tuple[int, int, int, int]] = []

    def batches(self, seed: int, start_step: int, rank: int, world_size: int):
        self.calls.append((seed, start_step, rank, world_size))
        while True:
            g = torch.Generator().manual_seed(seed * 1000 + self.position)
            x = torch.randn(self.batch_size // world_size, 3, generator=g)
            self.position += 1
            yield {"x": x, "y": x.sum(1).sin()}

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


class Recorder(Hook):
    def __init__(self, ckpt_dir: Path | None = None):
        self.ckpt_dir, self.calls = ckpt_dir, []

    def on_train_start(self, state):
        self.calls.append(("on_train_start", state.step, isinstance(state, TrainState)))

    def after_step(self, state, out):
        same = float(out["loss"].detach()) == float(state.loss)  # one process: the same loss
        self.calls.append(("after_step", state.step, same))

    def on_checkpoint(self, state):
        written = [p.name for p in list_checkpoints(self.ckpt_dir)] if self.ckpt_dir else []
        self.calls.append(("on_checkpoint", state.step, f"step_{state.step:07d}.pt" in written))

    def on_train_end(self, state):
        self.calls.append(("on_train_end", state.step, True))


def _ctx(run_dir: Path) -> Context:
    run_dir.mkdir(parents=True, exist_ok=True)
    return Context(run_dir=run_dir, device=torch.device("cpu"), logger=RunLogger(run_dir), seed=3)


def _trainer(dataset, **options) -> Trainer:
    base = dict(batch_size=4, max_steps=8, lr=0.05, backbone_lr=None, warmup_steps=2,
                num_workers=0, cpu_threads=1, checkpoint_every=2, keep_last=10, log_every=1)
    return Trainer(dataset=dataset, **{**base, **options})


def _losses(run_dir: Path) -> dict[int, float]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss/total"] for r in rows}


def test_a_custom_source_trains_and_resumes_exactly(tmp_path):
    assert isinstance(Stream(), DataSource)
    ref = _trainer(Stream()).fit(Regression(), _ctx(tmp_path / "ref"))

    stream, stop = Stream(), StopRequest()

    class StopAt5(Hook):
        def after_step(self, state, out):
            if state.step == 5:
                stop.request()

    with pytest.raises(Preempted):
        _trainer(stream, hooks=[StopAt5(), stop]).fit(Regression(), _ctx(tmp_path / "cut"))
    assert stream.position == 5
    saved = torch.load(tmp_path / "cut" / "checkpoints" / "step_0000005.pt", weights_only=False)
    assert set(saved) == {"model", "optimizer", "scaler", "lookahead", "step", "rng", "data"}
    assert saved["data"] == [{"position": 5}]  # one position per rank

    fresh = Stream()
    cut = _trainer(fresh).fit(Regression(), _ctx(tmp_path / "cut"))
    assert fresh.calls == [(3, 5, 0, 1)] and fresh.position == 8
    for a, b in zip(ref.state_dict().values(), cut.state_dict().values()):
        assert torch.equal(a, b)
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "ref")
    assert sorted(_losses(tmp_path / "ref")) == list(range(1, 9))


def test_a_map_style_checkpoint_has_todays_keys_and_no_data(tmp_path):
    x = torch.randn(10, 3)
    dataset = [{"x": x[i], "y": x[i].sum()} for i in range(10)]
    _trainer(dataset, max_steps=2).fit(Regression(), _ctx(tmp_path))
    saved = torch.load(tmp_path / "checkpoints" / "step_0000002.pt", weights_only=False)
    assert set(saved) == {"model", "optimizer", "scaler", "lookahead", "step", "rng"}


def test_hooks_are_called_at_the_documented_points_with_the_state(tmp_path):
    ctx = _ctx(tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    scoped, own, extra = Recorder(ckpt_dir), Recorder(ckpt_dir), Recorder(ckpt_dir)
    with training_hooks(scoped):
        _trainer(Stream(), max_steps=4, hooks=[own]).fit(Regression(), ctx, hooks=[extra])
    expected = [("on_train_start", 0, True),
                ("after_step", 1, True), ("after_step", 2, True), ("on_checkpoint", 2, True),
                ("after_step", 3, True), ("after_step", 4, True), ("on_checkpoint", 4, True),
                ("on_train_end", 4, True)]
    assert scoped.calls == own.calls == extra.calls == expected
    # a finished run calls no hook
    again = Recorder()
    _trainer(Stream(), max_steps=4).fit(Regression(), ctx, hooks=[again])
    assert again.calls == []


def test_a_source_with_another_batch_size_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="trainer.batch_size = 4.*Stream.*global batches of 6"):
        _trainer(Stream(batch_size=6)).fit(Regression(), _ctx(tmp_path))


def test_the_map_source_keeps_todays_order():
    # batches of StepBatchSampler(7, 3, 0, 1, seed=5, 0, 8) computed by the code before the
    # training loop was split into public parts
    old = [[4, 3, 6], [1, 5, 2], [0, 3, 1], [5, 6, 2], [0, 4, 1], [6, 3, 4], [5, 2, 0],
           [1, 4, 0]]
    keys = list(MapSource(list(range(7)), 3, 8).sampler(5, 0, 0, 1))
    assert [[i for i, _ in b] for b in keys] == old
    assert [b[0][1] for b in keys[:3]] == [10737430580, 10737454337, 10737478094]
    assert list(StepBatchSampler(7, 3, 0, 1, 5, 3, 8)) == keys[3:]
    batches = list(MapSource(list(range(7)), 3, 8).batches(5, 6, 0, 1))
    assert [b.tolist() for b in batches] == old[6:]  # dataset[i] == i, default collate


def test_the_engine_imports_no_evaluation_code():
    code = ("import sys, virtex.engine; print(sorted(m for m in sys.modules "
            "if m.startswith(('virtex.evaluation', 'virtex.plugins'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
