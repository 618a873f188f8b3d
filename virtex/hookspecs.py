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

What a backbone, task or launcher factory builds is checked against its protocol in
:mod:`virtex.contracts` (:class:`~virtex.contracts.Backbone`,
:class:`~virtex.contracts.Task`, :class:`~virtex.contracts.Launcher`) when it is built; a
mismatch stops the run with one error naming the component and what is missing.

Hooks are called through pluggy: ``@hookimpl(tryfirst=True)`` / ``trylast`` order a plugin's
registrations (otherwise the last registered plugin comes first), and a hook that raises
or returns something else than a mapping is one error naming the plugin.
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

    Contract (checked when built): :class:`virtex.contracts.Backbone`: an ``nn.Module``
    with ``out_channels`` (C, an int >= 1).
    """


@hookspec
def virtex_textual_heads() -> Factories:
    """Textual heads: modules mapping visual features and caption tokens to logits."""


@hookspec
def virtex_tasks() -> Factories:
    """Pretraining tasks: the modules the trainer trains.

    Contract: :class:`virtex.contracts.Task`, checked when built: the task holds its
    backbone (a :class:`~virtex.contracts.Backbone`) as ``.visual``; one with ``generate``
    (a captioning model) also has ``tokenizer`` and ``textual``
    (:class:`~virtex.contracts.CaptioningTask`). Checked at the first training step:
    ``forward(batch)`` returns ``{"loss": scalar tensor, "losses": {name: scalar tensor},
    "weight": optional}``, where ``weight`` is how many terms ``loss`` is the mean of on
    this rank (e.g. caption tokens): under DDP the trainer weights each rank's loss by it,
    so that the gradient is the one of the mean over the global batch.
    """


@hookspec
def virtex_datasets() -> Factories:
    """Datasets (``torch.utils.data.Dataset`` factories) for pretraining and evaluation."""


@hookspec
def virtex_transforms() -> Factories:
    """Image/caption transforms: callables on a sample dict."""


@hookspec
def virtex_evaluators() -> Factories:
    """Evaluators: ``evaluator(request) -> EvalResult`` (:class:`virtex.evaluation.api.Evaluator`).

    ``request`` is an immutable :class:`virtex.evaluation.api.EvalRequest` (backbone, model,
    ckpt, step, device, rank, world_size, run_dir, seed; ``log``/``info``); the
    result (:class:`~virtex.evaluation.api.EvalResult`) holds the metrics, summary lines and
    files written. Checked when built: what the factory builds must be callable.
    """


@hookspec
def virtex_launchers() -> Factories:
    """Launchers: factories of :class:`virtex.contracts.Launcher` objects (checked when built).

    ``python -m virtex.run --launcher NAME`` builds one, calls ``add_arguments(parser)`` (its
    own command-line options; ``--help`` lists every launcher's), ``set_options(options)``
    with the parsed command line, then ``launch(plan)`` (a :class:`virtex.plan.Plan`: the
    steps to place, in order, with their dependencies), which returns a
    :class:`virtex.contracts.LaunchResult`: the return code and whether the runs finished
    (the summary is then printed) or were only submitted.
    """


@hookspec
def virtex_train_hooks() -> Factories:
    """Training hooks: ``factory(trainer, ctx)`` returns a hook for that
    :class:`virtex.engine.Trainer` (see :class:`virtex.engine.Hook`) or None. Every
    registered factory is called at the start of every ``Trainer.fit``."""


@hookspec
def virtex_spec_dirs() -> Iterable[str | Path]:
    """Directories whose ``.gin`` files become runnable by their relative name."""
