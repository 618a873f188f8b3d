"""The paper's workflow as one plan: pretrain, sweep VOC07 over every checkpoint, choose the
best, transfer it to every downstream task, write the report.

A pipeline spec (``specs/pipeline/``) binds ``pipeline.*``; each stage is a spec file of
its own. The plan's run directory holds ``pretrain/``, ``<sweep>/step_NNNNNNN/`` (one run
per checkpoint, ``sweep.csv`` beside them), ``best.json`` and ``best.pt`` (a link to the
chosen checkpoint), one directory per downstream stage, ``summary.md`` and the report.
Bindings on the command line (``--gin_param``) other than ``pipeline.*`` apply to every
stage; ``--gin_param STAGE:NAME=VALUE`` (e.g. ``pretrain:trainer.max_steps=1000``) and
``pipeline.params`` give one stage its own.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gin

from virtex.errors import UserError
from virtex.job import Job
from virtex.plan import Action, Plan, Step


@gin.configurable("pipeline")
def settings(
    pretrain: str = gin.REQUIRED,
    sweep: str = "downstream/voc07",
    sweep_every: int = 1,
    select_metric: str = "voc07/mAP",
    select_steps: Sequence[int | None] | None = None,
    downstream: Mapping[str, str] | None = None,
    params: Mapping[str, Sequence[str]] | None = None,
    common: Sequence[str] = (),
    resources: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """What a pipeline runs.

    Args:
        pretrain: the pretraining spec (a name or a path).
        sweep: the spec evaluated on every checkpoint (its stage is named after the file).
        sweep_every: evaluate every n-th checkpoint (the last one always).
        select_metric: the sweep's metric the best checkpoint maximises (ties: later step).
        select_steps: ``(first, last)`` steps the choice may take (``None``: any).
        downstream: stage name -> spec, run on the chosen checkpoint.
        params: stage name (``pretrain``, the sweep's name, a downstream name) -> bindings
            (strings, or lists of them, e.g. a macro several stages share).
        common: bindings for every stage (before the stage's own).
        resources: stage name -> scheduler settings (``gpus``, ``time``, ``nodes``,
            ``array_parallelism``, ``cpus_per_task``, ``mem``); the local launcher ignores them.
    """
    if not isinstance(sweep_every, int) or sweep_every < 1:
        raise UserError(f"pipeline.sweep_every = {sweep_every!r}: expected an integer >= 1")
    return {"pretrain": pretrain, "sweep": sweep, "sweep_every": sweep_every,
            "select_metric": select_metric, "select_steps": select_steps,
            "downstream": dict(downstream or {}), "params": dict(params or {}),
            "common": list(common),
            "resources": dict(resources or {})}


_STAGED = re.compile(r"^\s*(\w+):(?!//)")


def stage_binding(param: str) -> str | None:
    """The stage of a ``STAGE:NAME=VALUE`` binding (for that stage of a pipeline only)."""
    m = _STAGED.match(param)
    return m.group(1) if m and "=" in param[m.end():] else None


def _flat(items: Any, what: str) -> list[str]:
    """Bindings given as strings, or lists of them (a macro shared by stages), in order."""
    if isinstance(items, str):
        return [items]
    if not isinstance(items, (list, tuple)):
        raise UserError(f"{what} = {items!r}: expected a list of bindings ('NAME = VALUE')")
    return [b for item in items for b in _flat(item, what)]


def _trainer_default(name: str) -> Any:
    from virtex.engine import Trainer

    return inspect.signature(Trainer.__init__).parameters[name].default


def _bound(name: str) -> Any:
    try:
        return gin.query_parameter(name)
    except ValueError:
        return _trainer_default(name.split(".")[-1])


def checkpoint_steps(every: int, max_steps: int, sweep_every: int) -> list[int]:
    """The steps whose checkpoints a run of ``max_steps`` keeps for the sweep: every
    ``every * sweep_every``-th, and the last."""
    stride = every * sweep_every
    return sorted({*range(stride, max_steps + 1, stride), max_steps})


def _stage_job(base: Job, spec: str, params: Sequence[str], run_dir: Path) -> Job:
    """A stage's run (its bindings are parsed and checked with every step's, by
    :func:`virtex.experiment.expand`)."""
    from virtex.config import resolve_spec, spec_name
    from virtex.registry import get_registry

    spec_dirs = get_registry().spec_dirs()
    path = resolve_spec(spec, spec_dirs)
    return Job(str(path), spec_name(path, spec_dirs), list(params), str(run_dir),
               base.gpus, base.nodes, base.seed, base.command)


def pipeline_plan(job: Job) -> Plan:
    """The steps of the pipeline spec ``job`` runs (its spec is parsed into gin)."""
    from virtex.config import load_spec

    got = settings()
    root = Path(job.run_dir)
    known = {"pretrain", Path(got["sweep"]).stem, *got["downstream"]}
    staged: dict[str, list[str]] = {}
    for p in job.params:
        stage = stage_binding(p)
        if stage is not None:
            if stage not in known:
                raise UserError(f"--gin_param {p}: unknown stage '{stage}', expected one of "
                                f"{', '.join(sorted(known))}")
            staged.setdefault(stage, []).append(p.split(":", 1)[1])
    given = [p for p in job.params if stage_binding(p) is None
             and not p.split("=", 1)[0].strip().startswith("pipeline.")]
    common = [*_flat(got["common"], "pipeline.common"), *given]
    for table in ("params", "resources"):
        for stage in got[table]:
            if stage not in known:
                raise UserError(f"pipeline.{table}: unknown stage '{stage}', expected one of "
                                f"{', '.join(sorted(known))}")

    def stage_params(stage: str) -> list[str]:
        return [*common, *_flat(got["params"].get(stage, ()), f"pipeline.params['{stage}']"),
                *staged.get(stage, ())]

    def resources(stage: str) -> dict[str, Any]:
        return dict(got["resources"].get(stage, {}))

    # pretraining, keeping every checkpoint the sweep evaluates
    pretrain_dir = root / "pretrain"
    pretrain = _stage_job(job, got["pretrain"], stage_params("pretrain"), pretrain_dir)
    load_spec(pretrain.spec, pretrain.params)  # how often it checkpoints, how long it trains
    every, max_steps = int(_bound("trainer.checkpoint_every")), int(_bound("trainer.max_steps"))
    pretrain.params.append(f"trainer.keep_every={every * got['sweep_every']}")
    last = pretrain_dir / "checkpoints" / f"step_{max_steps:07d}.pt"
    steps = [Step("pretrain", pretrain, resources=resources("pretrain"), outputs=[str(last)])]

    # the sweep: one run per checkpoint, each waiting for its file
    name = Path(got["sweep"]).stem
    sweep_dir = root / name
    ckpts = pretrain_dir / "checkpoints"
    members = []
    for step in checkpoint_steps(every, max_steps, got["sweep_every"]):
        path = ckpts / f"step_{step:07d}.pt"
        label = path.stem
        run = _stage_job(job, got["sweep"], [*stage_params(name), f"ckpt='{path}'"],
                         sweep_dir / label)
        members.append(Step(f"{name}/{label}", run, group=name, starts_after=["pretrain"],
                            before=[Action("wait_for", {"path": str(path),
                                                        "producer": str(pretrain_dir)})],
                            columns={"step": step, "checkpoint": str(path)},
                            resources=resources(name)))
    table = [[s.name.split("/", 1)[1], s.job.run_dir, s.columns] for s in members]
    for s in members:
        s.then += [Action("collect", {"parent": str(sweep_dir), "members": table,
                                      "curve_dir": str(pretrain_dir / "tensorboard")}),
                   Action("report", {"run_dir": str(root)})]
    steps += members

    # the downstream tasks, on the chosen checkpoint
    choose = Action("select", {"sweep": str(sweep_dir / "sweep.csv"),
                               "metric": got["select_metric"], "out": str(root),
                               "steps": list(got["select_steps"]) if got["select_steps"] else None})
    for stage, spec in got["downstream"].items():
        run = _stage_job(job, spec, [*stage_params(stage), f"ckpt='{root / 'best.pt'}'"],
                         root / stage)
        steps.append(Step(stage, run, after=[name], before=[choose],
                          then=[Action("report", {"run_dir": str(root)})],
                          resources=resources(stage)))
    return Plan(str(root), steps, "pipeline", job.command, common)
