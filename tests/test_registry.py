"""The plugin contract through the real entry-point machinery (pluggy + importlib.metadata)."""

from __future__ import annotations

import gin
import pytest
from cli import make_distribution, run_cli

from virtex.errors import UserError
from virtex.registry import KINDS, get_registry

EVALUATOR = '''
import virtex

from virtex.evaluation.api import EvalResult

class Zero:
    def __call__(self, request):
        return EvalResult({"zero": 0.0})

@virtex.hookimpl
def virtex_evaluators():
    return {"NAME": Zero}
'''


def test_builtins_are_registered_through_entry_points():
    registry = get_registry()
    assert not registry.failures
    assert {"resnet18", "resnet50", "resnet101", "wide_resnet50_2"} <= set(registry.names("backbones"))
    assert "local" in registry.names("launchers")
    plugins = {c.plugin for kind in KINDS for c in registry.components(kind)}
    assert {"models", "launchers"} <= plugins
    # specs/ is a spec dir registered by a plugin, not hard-coded
    assert any(d.name == "specs" for d in registry.spec_dirs())


def test_factories_are_gin_configurable_as_kind_dot_name():
    registry = get_registry()
    gin.clear_config()
    gin.parse_config("backbones.resnet18.frozen_bn = True")
    try:
        backbone = registry.get("backbones", "resnet18")()
        assert type(backbone.cnn.bn1).__name__ == "FrozenBatchNorm2d"
    finally:
        gin.clear_config()
    assert type(registry.get("backbones", "resnet18")().cnn.bn1).__name__ == "BatchNorm2d"


def test_unknown_component_names_close_matches():
    with pytest.raises(UserError, match=r"unknown backbones 'resnet5'.*Did you mean: resnet50"):
        get_registry().get("backbones", "resnet5")


def test_list_shows_components_with_their_plugin():
    res = run_cli("--list")
    assert res.returncode == 0, res.stderr
    assert "backbones.resnet50" in res.stdout and "(plugin: models)" in res.stdout
    assert "launchers.local" in res.stdout


def test_duplicate_names_from_two_plugins_is_an_error_naming_both(tmp_path):
    site = make_distribution(
        tmp_path / "site", "dup_plugins",
        {"dup_a": EVALUATOR.replace("NAME", "same"), "dup_b": EVALUATOR.replace("NAME", "same")},
        {"first_dup": "dup_a", "second_dup": "dup_b"},
    )
    res = run_cli("--list", pythonpath=[site])
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0, res.stderr
    assert "evaluators.same" in res.stderr
    assert "first_dup" in res.stderr and "second_dup" in res.stderr


def test_a_plugin_that_fails_to_import_is_named_and_the_rest_still_load(tmp_path):
    site = make_distribution(
        tmp_path / "site", "broken_plugin",
        {"broken_mod": "raise ImportError('needs a library that is not installed')",
         "good_mod": EVALUATOR.replace("NAME", "still_here")},
        {"broken": "broken_mod", "good": "good_mod"},
    )
    res = run_cli("--list", pythonpath=[site])
    assert res.returncode == 0, res.stderr
    assert "plugin 'broken'" in res.stderr and "broken_mod" in res.stderr
    assert "needs a library" in res.stderr
    assert "evaluators.still_here" in res.stdout
    assert "backbones.resnet50" in res.stdout
