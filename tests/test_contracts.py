"""Typed contracts checked when built (virtex.contracts), and hooks called through pluggy.

Third-party-style plugins are registered through the real pluggy manager
(``load_plugins(extra=...)``) or installed as a real distribution and run with
``python -m virtex.run``.
"""

from __future__ import annotations

import types

import pytest
import torch
from cli import make_distribution, run_cli
from torch import nn

import virtex
from virtex.contracts import (
    Backbone,
    Launcher,
    LaunchResult,
    Task,
    check_task_output,
    members,
)
from virtex.errors import UserError
from virtex.registry import Registry, load_plugins


def _plugin(name: str, **hooks: object) -> types.ModuleType:
    """A plugin module ``name`` whose hooks are the given functions (already hookimpls)."""
    module = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(module, hook, fn)
    return module


def _registry(*plugins: types.ModuleType) -> Registry:
    pm, failures = load_plugins(extra=plugins)
    return Registry(pm, failures)


class TinyBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.out_channels = 4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)


class FlatBackbone(nn.Module):  # no out_channels
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))


class NoVisual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cnn = TinyBackbone()


class FlatVisual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = FlatBackbone()


class HalfCaptioner(nn.Module):  # generate without a tokenizer
    def __init__(self) -> None:
        super().__init__()
        self.visual, self.textual = TinyBackbone(), nn.Linear(4, 4)

    def generate(self, images: torch.Tensor) -> list[list[int]]:
        return [[] for _ in images]


class NoLaunch:
    def add_arguments(self, parser) -> None:
        pass

    def set_options(self, options) -> None:
        pass


def _tasks():
    return {"no_visual": NoVisual, "flat_visual": FlatVisual, "half_captioner": HalfCaptioner}


BAD = _plugin(
    "bar",
    virtex_tasks=virtex.hookimpl(_tasks),
    virtex_backbones=virtex.hookimpl(lambda: {"flat": FlatBackbone, "tiny": TinyBackbone}),
    virtex_launchers=virtex.hookimpl(lambda: {"no_launch": NoLaunch}),
)


@pytest.mark.parametrize("kind, name, needles", [
    ("tasks", "no_visual", ["tasks.no_visual from plugin 'bar'", "virtex.contracts.Task",
                            "it has no attribute 'visual'"]),
    ("tasks", "flat_visual", ["tasks.flat_visual from plugin 'bar'",
                              "its 'visual' (FlatBackbone) is not a virtex.contracts.Backbone",
                              "no attribute 'out_channels'"]),
    ("tasks", "half_captioner", ["tasks.half_captioner from plugin 'bar'",
                                 "virtex.contracts.CaptioningTask",
                                 "it has no attribute 'tokenizer'"]),
    ("backbones", "flat", ["backbones.flat from plugin 'bar'", "virtex.contracts.Backbone",
                           "it has no attribute 'out_channels'"]),
    ("launchers", "no_launch", ["launchers.no_launch from plugin 'bar'",
                                "virtex.contracts.Launcher", "it has no attribute 'launch'"]),
])
def test_what_a_factory_builds_is_checked_against_its_kinds_protocol(kind, name, needles):
    factory = _registry(BAD).get(kind, name)
    with pytest.raises(UserError) as info:
        factory()
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_components_that_fit_pass_and_keep_their_signature():
    registry = _registry(BAD)
    backbone = registry.get("backbones", "tiny")()
    assert isinstance(backbone, TinyBackbone) and isinstance(backbone, Backbone)
    for name in ("local", "slurm"):  # the built-in launchers fit their contract
        assert isinstance(registry.get("launchers", name)(), Launcher)
    resnet = registry.get("backbones", "resnet18")(frozen_bn=True)
    assert resnet.out_channels == 512
    with pytest.raises(TypeError):  # gin and Python still see the factory's own arguments
        registry.get("backbones", "resnet18")(depth=3)


def test_the_protocols_declare_what_the_kernel_reads():
    assert list(members(Task)) == ["visual", "__call__", "parameters", "state_dict"]
    assert "out_channels" in members(Backbone)
    assert {"add_arguments", "set_options", "launch"} <= set(members(Launcher))


def _out(**extra: object) -> dict:
    loss = torch.tensor(1.5, requires_grad=True)
    return {"loss": loss, "losses": {"part": loss.detach()}, **extra}


@pytest.mark.parametrize("out", [
    _out(), _out(weight=7), _out(weight=2.5), _out(weight=torch.tensor(3)),
    _out(weight=None), _out(weight=torch.tensor([3.0])),
])
def test_a_loss_dict_that_fits(out):
    check_task_output(out, "tasks.x")


@pytest.mark.parametrize("out, needles", [
    ([torch.tensor(1.0)], ["returned a list", "'loss' and 'losses'"]),
    ({"loss": torch.tensor(1.0)}, ["without 'losses'", "it has 'loss'"]),
    ({"losses": {}}, ["without 'loss'"]),
    (_out(loss=torch.ones(2)), ["'loss' = a Tensor of shape (2,)", "scalar float tensor"]),
    (_out(loss=1.0), ["'loss' = float 1.0"]),
    (_out(losses={"part": 0.5}), ["'losses'['part'] = float 0.5", "scalar tensor"]),
    (_out(weight=torch.tensor([1, 2])), ["'weight' = a Tensor of shape (2,)",
                                         "how many terms 'loss' averages over"]),
    (_out(weight=[1, 2]), ["'weight' = list [1, 2]"]),
    (_out(weight=True), ["'weight' = bool True"]),
])
def test_a_loss_dict_that_does_not_fit_is_one_error_naming_the_component(out, needles):
    with pytest.raises(UserError) as info:
        check_task_output(out, "tasks.foo from plugin 'bar'")
    text = str(info.value)
    assert text.startswith("tasks.foo from plugin 'bar': forward(batch) returned ")
    for needle in needles:
        assert needle in text, text


# -- hooks through pluggy -------------------------------------------------------------------------
def _dirs(path: str, **marks: bool):
    return virtex.hookimpl(**marks)(lambda: [path])


def test_hooks_are_called_in_pluggys_order_tryfirst_first_then_last_registered_first():
    first = _plugin("p_first", virtex_spec_dirs=_dirs("/first", tryfirst=True))
    last = _plugin("p_last", virtex_spec_dirs=_dirs("/last", trylast=True))
    a = _plugin("p_a", virtex_spec_dirs=_dirs("/a"))
    b = _plugin("p_b", virtex_spec_dirs=_dirs("/b"))
    dirs = [str(d) for d in _registry(last, first, a, b).spec_dirs()]
    assert dirs[0] == "/first" and dirs[-1] == "/last"
    assert dirs.index("/b") < dirs.index("/a")  # pluggy calls the last registered first
    builtin = next(i for i, d in enumerate(dirs) if d.endswith("specs"))
    assert dirs.index("/a") < builtin < dirs.index("/last")  # extras register after entry points


def _evaluators(name: str, **marks: bool):
    class Zero:
        def __call__(self, ctx):
            return {}

    return virtex.hookimpl(**marks)(lambda: {name: Zero})


def test_a_tryfirst_plugin_registers_first():
    plain = _plugin("plain_plugin", virtex_evaluators=_evaluators("same_a"))
    eager = _plugin("eager_plugin", virtex_evaluators=_evaluators("same_a", tryfirst=True))
    with pytest.raises(UserError, match="evaluators.same_a is registered twice: by plugin "
                                        "'eager_plugin' and by plugin 'plain_plugin'"):
        _registry(eager, plain)
    # without tryfirst, pluggy's order: the plugin registered last comes first
    one = _plugin("one_plugin", virtex_evaluators=_evaluators("same_b"))
    two = _plugin("two_plugin", virtex_evaluators=_evaluators("same_b"))
    with pytest.raises(UserError, match="by plugin 'two_plugin' and by plugin 'one_plugin'"):
        _registry(one, two)


def test_a_hook_that_raises_is_one_error_naming_the_plugin():
    def boom():
        raise RuntimeError("the dataset server is down")

    raiser = _plugin("raiser", virtex_datasets=virtex.hookimpl(boom))
    with pytest.raises(UserError) as info:
        _registry(raiser)
    assert str(info.value) == ("plugin 'raiser': virtex_datasets() raised RuntimeError: the "
                               "dataset server is down")
    assert isinstance(info.value.__cause__, RuntimeError)  # pluggy's exception, kept


@pytest.mark.parametrize("result, needle", [
    (["resnet"], "virtex_backbones() returned list, expected a mapping name -> factory"),
    ({"resnet": 3}, "virtex_backbones() maps 'resnet' to int, expected a string name and a "
                    "factory (a class or a function)"),
])
def test_a_hook_returning_no_mapping_of_factories_is_an_error_naming_the_plugin(result, needle):
    odd = _plugin("odd_plugin", virtex_backbones=virtex.hookimpl(lambda: result))
    with pytest.raises(UserError) as info:
        _registry(odd)
    assert str(info.value) == f"plugin 'odd_plugin': {needle}"


def test_pluggy_tracing_sees_the_registrys_hook_calls():
    pm, failures = load_plugins()
    lines: list[str] = []
    pm.trace.root.setwriter(lines.append)
    undo = pm.enable_tracing()
    try:
        Registry(pm, failures).spec_dirs()
    finally:
        undo()
    text = "".join(lines)
    for hook in ("virtex_backbones", "virtex_launchers", "virtex_spec_dirs"):
        assert f"{hook} [hook]" in text, text[:500]
        assert f"finish {hook} -->" in text


def test_a_wrapper_of_another_plugin_wraps_each_plugins_call():
    seen: list[object] = []

    def watch():
        result = yield
        seen.append(result)
        return result

    watcher = _plugin("watcher", virtex_launchers=virtex.hookimpl(wrapper=True)(watch))
    _registry(watcher)
    assert any(set(r[0]) == {"local", "slurm"} for r in seen if r), seen


def test_a_function_that_is_no_hook_is_pluggys_validation_error_naming_the_plugin():
    typo = _plugin("typo_plugin", virtex_evaluator=virtex.hookimpl(lambda: {}))
    pm, failures = load_plugins(extra=[typo])
    assert [f.plugin for f in failures] == ["typo_plugin"]
    assert failures[0].error.startswith("PluginValidationError: unknown hook 'virtex_evaluator'")
    assert not pm.is_registered(typo)
    assert "resnet50" in Registry(pm, failures).names("backbones")  # the others still load


# -- through python -m virtex.run -------------------------------------------------------------------
CLI_PLUGIN = '''
import torch
from torch import nn

import virtex
from virtex.contracts import LaunchResult


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.out_channels = 2

    def forward(self, images):
        return self.conv(images)


class NoVisual(nn.Module):
    def forward(self, batch):
        raise AssertionError("never trained")


class BadWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = Tiny()

    def forward(self, batch):
        loss = self.visual(batch["image"]).pow(2).mean()
        return {"loss": loss, "losses": {"l2": loss.detach()}, "weight": [1.0, 2.0]}


def blank_images(n: int = 4):
    return [{"image": torch.zeros(3, 8, 8)} for _ in range(n)]


class Echo:
    """Prints its option instead of running the job; only submitted."""

    def add_arguments(self, parser):
        parser.add_argument("--echo_message", default="hello", help="what to print")

    def set_options(self, options):
        self.message = options.echo_message

    def launch(self, plan):
        print(f"echo: {self.message} {' '.join(s.job.spec_name for s in plan.steps)}")
        return LaunchResult(returncode=0, finished=False, job_id="e1")


class OldStyle(Echo):
    def launch(self, plan):
        return 0


class Greedy(Echo):
    def add_arguments(self, parser):
        parser.add_argument("--gpus", type=int)


@virtex.hookimpl
def virtex_tasks():
    return {"no_visual": NoVisual, "bad_weight": BadWeight}


@virtex.hookimpl
def virtex_datasets():
    return {"blank_images": blank_images}


@virtex.hookimpl
def virtex_launchers():
    return {"echo": Echo, "old_style": OldStyle, "greedy": Greedy}
'''

TRAIN_SPEC = """
experiment.task = @tasks.TASK
experiment.trainer = @trainer()
trainer.dataset = @datasets.blank_images()
trainer.batch_size = 2
trainer.max_steps = 1
trainer.warmup_steps = 0
trainer.num_workers = 0
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract_site")
    return make_distribution(root / "site", "virtex_contract_test",
                             {"virtex_contract_test": CLI_PLUGIN},
                             {"contract_test": "virtex_contract_test"})


def _one_error_line(res) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("virtex: error: "), res.stderr
    return lines[0]


@pytest.mark.parametrize("task, needles", [
    ("no_visual", ["tasks.no_visual from plugin 'contract_test' built a NoVisual, not a "
                   "virtex.contracts.Task: it has no attribute 'visual'"]),
    ("bad_weight", ["tasks.bad_weight from plugin 'contract_test': forward(batch) returned "
                    "'weight' = list [1.0, 2.0]", "a number or a one-element tensor"]),
])
def test_a_task_that_breaks_its_contract_stops_the_run_with_one_line(site, tmp_path, task,
                                                                      needles):
    spec = tmp_path / "train.gin"
    spec.write_text(TRAIN_SPEC.replace("TASK", task))
    res = run_cli(str(spec), "--run_dir", str(tmp_path / "run"), cwd=tmp_path, pythonpath=[site])
    line = _one_error_line(res)
    for needle in needles:
        assert needle in line, line


def test_a_launcher_adds_its_options_and_returns_a_launch_result(site, tmp_path):
    spec = tmp_path / "train.gin"
    spec.write_text(TRAIN_SPEC.replace("TASK", "bad_weight"))
    res = run_cli("--echo_message", "hi", str(spec), "--launcher", "echo", "--run_dir",
                  str(tmp_path / "run"), cwd=tmp_path, pythonpath=[site])
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["echo: hi train"]  # only submitted: no summary printed

    res = run_cli("--help", cwd=tmp_path, pythonpath=[site])
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "options of --launcher echo:" in out and "--echo_message" in out
    assert "options of --launcher slurm:" in out and "--slurm_partition" in out
    assert out.index("--gin_param") < out.index("options of --launcher")

    line = _one_error_line(run_cli(str(spec), "--launcher", "old_style", "--run_dir",
                                   str(tmp_path / "run"), cwd=tmp_path, pythonpath=[site]))
    assert ("launchers.old_style from plugin 'contract_test': launch(plan) returned int 0, "
            "expected a virtex.contracts.LaunchResult") in line

    line = _one_error_line(run_cli(str(spec), "--launcher", "greedy", cwd=tmp_path,
                                   pythonpath=[site]))
    assert "launchers.greedy: add_arguments: argument --gpus: conflicting option string" in line


def test_launch_result_defaults_to_a_finished_run():
    assert LaunchResult() == LaunchResult(returncode=0, finished=True, job_id=None, output=None)
