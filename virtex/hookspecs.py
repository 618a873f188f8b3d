"""The plugin contract: the hooks a virtex plugin may implement.

A plugin is any module with functions decorated by :data:`hookimpl` whose names
are the hooks below, exposed through an entry point in the ``virtex`` group::

    [project.entry-points.virtex]
    my_plugin = "my_package.virtex_plugin"

Every component hook returns a mapping ``name -> factory`` (a class or a
function). The runner makes each factory gin-configurable as ``<kind>.<name>``,
e.g. ``evaluators.voc07_svm``, so specs bind its arguments and reference it as
``@evaluators.voc07_svm()``. Built-in components register through exactly this
mechanism.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pluggy

PROJECT = "virtex"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Factories = Mapping[str, Callable]


@hookspec
def virtex_backbones() -> Factories:
    """Visual backbones: modules mapping images ``(N,3,H,W)`` to a feature map ``(N,C,h,w)``.

    A backbone should expose ``out_channels`` (C).
    """


@hookspec
def virtex_textual_heads() -> Factories:
    """Textual heads: modules mapping visual features and caption tokens to logits."""


@hookspec
def virtex_tasks() -> Factories:
    """Pretraining objectives: modules whose ``forward(batch)`` returns ``{"loss", "losses"}``.

    A task module holds its visual backbone as ``.visual``.
    """


@hookspec
def virtex_datasets() -> Factories:
    """Datasets (``torch.utils.data.Dataset`` factories) for pretraining and evaluation."""


@hookspec
def virtex_transforms() -> Factories:
    """Image/caption transforms: callables on a sample dict."""


@hookspec
def virtex_evaluators() -> Factories:
    """Evaluators: ``evaluator(ctx) -> dict[str, float]``.

    ``ctx`` is a :class:`virtex.context.Context` carrying ``backbone``, ``device``,
    ``run_dir``, ``log(metrics, step)``, ``rank`` and ``world_size``.
    """


@hookspec
def virtex_launchers() -> Factories:
    """Launchers: factories of objects with ``launch(job) -> int`` (see ``virtex.runner.Job``).

    A launcher with command-line flags of its own also has ``parse_options(argv) -> list``:
    it takes its flags from anywhere in ``argv`` and returns the other arguments.
    """


@hookspec
def virtex_train_hooks() -> Factories:
    """Training hooks: ``factory(trainer, ctx)`` returns a hook for that
    :class:`virtex.engine.Trainer` (see :class:`virtex.engine.Hook`) or None. Every
    registered factory is called at the start of every ``Trainer.fit``."""


@hookspec
def virtex_spec_dirs() -> Iterable[str | Path]:
    """Directories whose ``.gin`` files become runnable by their relative name."""
