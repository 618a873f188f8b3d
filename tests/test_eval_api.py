"""The evaluation API (virtex.evaluation.api) and how the runner uses it: one request per
evaluation, results collected, a checkpoint's step given explicitly."""

from __future__ import annotations

import dataclasses
import json

import gin
import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from virtex import checkpoint, dist
from virtex.context import Context, RunLogger
from virtex.errors import UserError
from virtex.evaluation.api import (
    EvalRequest,
    EvalResult,
    Evaluator,
    gather,
    inference,
    shard,
)
from virtex.experiment import experiment, format_table
from virtex.models.visual import ResNetBackbone


@pytest.fixture(autouse=True)
def no_gin_bindings():
    """``experiment`` is called directly here: no binding of an earlier test may reach it."""
    gin.clear_config()
    yield
    gin.clear_config()


def _mixed() -> nn.Module:
    """A module in train mode whose BatchNorm child is in eval mode (frozen statistics)."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout(0.5))
    model.train()
    model[1].eval()
    return model


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_inference_is_eval_and_no_grad_and_restores_every_submodule():
    model, other = _mixed(), nn.Linear(2, 2).eval()
    before = _modes(model)
    with inference(model, other):
        assert not any(_modes(model)) and not other.training
        assert not torch.is_grad_enabled()
        assert not model(torch.ones(3, 2)).requires_grad
    assert _modes(model) == before == [True, True, False, True]
    assert not other.training and torch.is_grad_enabled()


def test_inference_restores_the_modes_after_an_error():
    model = _mixed()
    with pytest.raises(RuntimeError, match="inside"), inference(model):
        raise RuntimeError("inside")
    assert _modes(model) == [True, True, False, True] and torch.is_grad_enabled()


def test_shard_gives_every_item_to_exactly_one_rank():
    items = list("abcdefg")
    parts = [shard(items, rank, 3) for rank in range(3)]
    assert parts == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    assert shard(range(5), 1, 2) == [1, 3]
    dataset = TensorDataset(torch.arange(7))
    part = shard(dataset, 2, 3)
    assert isinstance(part, Subset) and [int(x[0]) for x in part] == [2, 5]
    with pytest.raises(ValueError, match=r"rank 3 is not in \[0, 3\)"):
        shard(items, 3, 3)


def test_gather_in_one_process_is_the_list_itself():
    assert not dist.is_initialized()
    assert gather(("x", "y")) == ["x", "y"] and gather([]) == []


def _shard_and_gather(rank: int, world_size: int, port: int, out: str) -> None:
    dist.init(rank, world_size, "127.0.0.1", port, "gloo")
    try:
        mine = shard(list(range(11)), rank, world_size)
        everything = gather([(rank, i) for i in mine])
        if rank == 0:
            with open(out, "w") as f:
                json.dump(everything, f)
    finally:
        dist.shutdown()


def test_shard_then_gather_over_two_processes_covers_the_list_once(tmp_path):
    out = tmp_path / "gathered.json"
    torch.multiprocessing.spawn(_shard_and_gather, args=(2, dist.free_port(), str(out)),
                                nprocs=2)
    gathered = json.loads(out.read_text())
    assert gathered == [[0, i] for i in range(0, 11, 2)] + [[1, i] for i in range(1, 11, 2)]


def test_request_is_immutable_and_forwards_logging_at_its_step(tmp_path):
    request = EvalRequest(backbone=nn.Identity(), device=torch.device("cpu"), run_dir=tmp_path,
                          logger=RunLogger(tmp_path), step=5, seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.step = 6  # type: ignore[misc]
    request.log({"a": 1.0})
    request.log({"b": 2.0}, step=9)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 5, "a": 1.0}, {"step": 9, "b": 2.0}]
    ctx = request.trainer_context()
    assert isinstance(ctx, Context) and (ctx.step, ctx.seed, ctx.logger) == (5, 3, request.logger)
    request.logger.close()


class Recorder:
    """Records each request; returns its step as a metric and one summary line."""

    def __init__(self):
        self.requests: list[EvalRequest] = []

    def __call__(self, request: EvalRequest) -> EvalResult:
        self.requests.append(request)
        return EvalResult({"rec/step": float(request.step)}, [f"evaluated step {request.step}"])


class ReturnsDict:
    def __call__(self, request: EvalRequest) -> dict[str, float]:
        return {"x": 1.0}


def _ctx(tmp_path) -> Context:
    return Context(run_dir=tmp_path, device=torch.device("cpu"), logger=RunLogger(tmp_path))


def test_an_evaluator_satisfies_the_protocol():
    assert isinstance(Recorder(), Evaluator) and not isinstance(object(), Evaluator)


def test_a_step_checkpoint_gives_the_request_its_step_also_through_a_link(tmp_path):
    ckpts = tmp_path / "ckpts"
    cnn = ResNetBackbone("resnet18").cnn.state_dict()
    path = checkpoint.save({"model": {f"visual.cnn.{k}": v for k, v in cnn.items()}}, ckpts, 4)
    (tmp_path / "best.pt").symlink_to(path)
    recorder = Recorder()
    ctx = _ctx(tmp_path / "run")
    (tmp_path / "run").mkdir()
    for given in (path, tmp_path / "best.pt"):
        outcome = experiment(ctx, backbone=lambda: ResNetBackbone("resnet18"),
                             evaluators=[recorder], ckpt=str(given))
        assert outcome.metrics == {"rec/step": 4.0}
    assert [(r.step, r.ckpt) for r in recorder.requests] == [(4, path), (4, tmp_path / "best.pt")]
    assert ctx.step == 0  # the run's own step is left alone
    with pytest.raises(UserError, match="is a directory: a checkpoint sweep is a plan"):
        experiment(ctx, backbone=lambda: ResNetBackbone("resnet18"), evaluators=[recorder],
                   ckpt=str(ckpts))
    ctx.logger.close()


def test_one_checkpoint_and_the_random_init_comparison_get_their_own_requests(tmp_path):
    cnn = ResNetBackbone("resnet18").cnn.state_dict()
    path = tmp_path / "init.pth"
    torch.save(cnn, path)
    recorder = Recorder()
    outcome = experiment(_ctx(tmp_path), backbone=lambda: ResNetBackbone("resnet18"),
                         evaluators=[recorder, Recorder()], ckpt=str(path),
                         weight_init="torchvision", compare_random_init=True)
    first, random_init = recorder.requests
    assert (first.ckpt, first.step, first.model) == (path, 0, None)
    assert torch.equal(first.backbone.cnn.conv1.weight, cnn["conv1.weight"])
    assert random_init.ckpt is None and random_init.backbone is not first.backbone
    assert outcome.metrics == {"rec/step": 0.0, "Recorder/rec/step": 0.0,
                               "random_init/rec/step": 0.0,
                               "random_init/Recorder/rec/step": 0.0}
    assert outcome.summary == ["evaluated step 0"] * 4
    assert "| rec/step |" in format_table(outcome.metrics)


def test_an_evaluator_returning_a_dict_is_one_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match=r"evaluator ReturnsDict returned dict: expected a "
                                        r"virtex\.evaluation\.api\.EvalResult"):
        experiment(_ctx(tmp_path), backbone=lambda: ResNetBackbone("resnet18"),
                   evaluators=[ReturnsDict()], weight_init="random")
