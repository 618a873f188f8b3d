"""Experiments (`virtex.experiment`; the CLI is `virtex.run`): what a spec asks for, run in one process of a launch.

A launcher (local, SLURM, ...) turns a :class:`Job` into processes; each process
calls :func:`run_job`, which re-reads the spec, joins the process group, builds
the experiment from gin and runs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gin
import numpy as np
import torch

import virtex.data.cache  # noqa: F401  registers the shapes_dir configurable
import virtex.engine  # noqa: F401  registers the trainer configurable
from virtex import dist, io, lock, zoo
from virtex.config import defined_macros, load_spec, parse_spec, resolve_spec, spec_name
from virtex.context import Context, RunLogger
from virtex.errors import UserError
from virtex.evaluation.api import EvalRequest, EvalResult
from virtex.job import Job, check_config
from virtex.pipeline import pipeline_plan, stage_binding
from virtex.plan import Plan, checkpoint_directory, single, sweep_steps
from virtex.registry import get_registry
from virtex.report import is_headline
from virtex.weights import load_backbone_weights


def config_hash(config: str, seed: int) -> str:
    return hashlib.sha1(f"{config}\nseed={seed}".encode()).hexdigest()[:8]


def prepare(spec: str, params: Sequence[str], run_dir: str | None = None, gpus: int | None = None,
            nodes: int = 1, seed: int = 0, argv: Sequence[str] | None = None) -> Job:
    """Resolve and parse a spec (all errors surface here), choose and create the run dir."""
    registry = get_registry()
    spec_dirs = registry.spec_dirs()
    staged = [p for p in params if stage_binding(p)]  # a pipeline's STAGE:NAME=VALUE
    own = _expand_zoo(resolve_spec(spec, spec_dirs), [p for p in params if p not in staged],
                      spec_dirs, registry)
    params = [*own, *staged]
    path = load_spec(spec, own, registry)
    name = spec_name(path, spec_dirs)
    config = gin.config_str()
    pipeline = any(line.startswith("pipeline.") for line in config.splitlines())
    if not pipeline and not any(line.startswith("experiment.") for line in config.splitlines()):
        raise UserError(f"spec {path} runs nothing: it binds no experiment (experiment.task "
                        "to pretrain, experiment.evaluators to evaluate) and no pipeline")
    if staged and not pipeline:
        raise UserError(f"--gin_param {staged[0]}: a STAGE:NAME=VALUE binding is for a pipeline "
                        f"spec's stage, and {path} is not a pipeline")
    if run_dir is None:
        run_dir = str(Path("runs") / name / config_hash("\n".join([config, *staged]), seed))
    command = shlex.join(["python", "-m", "virtex.run", *(argv if argv is not None else sys.argv[1:])])
    return Job(str(path), name, list(params), str(Path(run_dir).resolve()), gpus, nodes, seed, command)


def _expand_zoo(path: Path, params: Sequence[str], spec_dirs: list[Path],
                registry: Any) -> list[str]:
    """Bindings ``KEY=zoo:NAME`` become the published file (downloaded now, once, in the
    launching process) and the spec's model macros its architecture (:mod:`virtex.zoo`)."""
    if not any(zoo.zoo_name(p) for p in params):
        return list(params)
    parse_spec(path, [p for p in params if not zoo.zoo_name(p)], spec_dirs, registry,
               check_required=False)
    macros = {name: str(gin.query_parameter(f"%{name}")) for name in defined_macros()}
    return zoo.expand_params(params, macros)


@contextlib.contextmanager
def own_run_dir(job: Job) -> Iterator[None]:
    """Hold the run directory's lock for the block (see :mod:`virtex.lock`) and first
    remove the temporaries that killed writers left in it."""
    with lock.hold(job.run_dir):
        io.remove_stale_temporaries(job.run_dir, other_hosts=True)
        yield


def expand(job: Job, sweeps: Sequence[tuple[str, list[str]]] = ()) -> Plan:
    """The plan of a prepared job (its spec parsed into gin by ``prepare``): a pipeline's
    stages, a sweep's members, or the run itself. Every step's bindings are parsed now, so
    that a bad one is one error before anything runs or is submitted."""
    config = gin.config_str()
    if any(line.startswith("pipeline.") for line in config.splitlines()):
        if sweeps:
            raise UserError("--sweep does not apply to a pipeline spec: bind the stages' "
                            "values with pipeline.params")
        plan = pipeline_plan(job)
        plan.config = config
    else:
        steps = sweep_steps(job, sweeps, checkpoint_directory())
        if not steps:
            return single(job)
        plan = Plan(job.run_dir, steps, "sweep", job.command, list(job.params))
    for step in plan.steps:
        path = load_spec(step.job.spec, step.job.params)
        bound = gin.config_str()
        if not any(line.startswith("experiment.") for line in bound.splitlines()):
            raise UserError(f"{plan.kind} step '{step.name}': spec {path} runs nothing (it "
                            "binds no experiment)")
        check_config(step.job, bound)
    return plan


def init_run_dir(job: Job) -> Path:
    run_dir = Path(job.run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    io.write_text(run_dir / "command.txt", job.command + "\n")
    io.write_text(run_dir / "config.gin", gin.config_str())
    return run_dir


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _device(job: Job, local_rank: int) -> torch.device:
    if job.gpus and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def run_job(job: Job, rank: int = 0, world_size: int = 1, local_rank: int = 0,
            master_addr: str = "127.0.0.1", master_port: int = 29500) -> dict[str, float]:
    """Run one process of ``job``; rank 0 writes ``metrics.json`` and returns the metrics."""
    load_spec(job.spec, job.params)
    device = _device(job, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init(rank, world_size, master_addr, master_port, backend)
    try:
        run_dir = Path(job.run_dir)
        if rank == 0:
            init_run_dir(job)
        dist.barrier()
        _seed_everything(job.seed + rank)
        logger = RunLogger(run_dir, rank)
        ctx = Context(run_dir=run_dir, device=device, logger=logger, rank=rank,
                      world_size=world_size, seed=job.seed)
        logger.info(f"run {job.spec_name} in {run_dir} on {device} ({world_size} process(es))")
        try:
            outcome = experiment(ctx)
        except RuntimeError as exc:
            if "Required bindings" in str(exc):
                raise UserError(str(exc).splitlines()[0]) from None
            raise
        finally:
            if rank == 0:
                io.write_text(run_dir / "operative_config.gin", gin.operative_config_str())
            logger.close()
        metrics, extra = outcome.metrics, outcome.summary
        if rank == 0:
            io.write_json(run_dir / "metrics.json", metrics)
            summary = format_table(metrics)
            io.write_text(run_dir / "summary.md", summary + ("\n\n" + "\n".join(extra) if extra else "") + "\n")
        return metrics
    finally:
        dist.shutdown()


def _request(ctx: Context, backbone: torch.nn.Module, model: torch.nn.Module | None = None,
             ckpt: Path | None = None) -> EvalRequest:
    """The request of one evaluation in this process; its step is the run's, or the one a
    ``step_NNNNNNN.pt`` checkpoint was saved at."""
    from virtex.checkpoint import step_of

    step = step_of(Path(ckpt).resolve()) if ckpt is not None and model is None else None
    return EvalRequest(backbone=backbone, device=ctx.device, run_dir=ctx.run_dir,
                       logger=ctx.logger, model=model, ckpt=ckpt,
                       step=ctx.step if step is None else step, rank=ctx.rank,
                       world_size=ctx.world_size, seed=ctx.seed)


def _evaluate(evaluators: Sequence[Callable], request: EvalRequest,
              prefix: str = "") -> EvalResult:
    """Run each evaluator on ``request``: their metrics (a name two evaluators share gets
    the evaluator's class name), summary lines and files, in order."""
    total = EvalResult()
    for evaluator in evaluators:
        name = type(evaluator).__name__
        request.info(f"evaluating {prefix}{name}")
        result = evaluator(request)
        if not isinstance(result, EvalResult) or not isinstance(result.metrics, dict):
            what = type(result).__name__ if not isinstance(result, EvalResult) else \
                f"an EvalResult whose metrics are a {type(result.metrics).__name__}"
            raise UserError(f"evaluator {name} returned {what}: expected a "
                            "virtex.evaluation.api.EvalResult (metrics: a dict of name -> "
                            "number; summary lines; files written)")
        for key, value in result.metrics.items():
            full = f"{prefix}{key}"
            if full in total.metrics:
                full = f"{prefix}{name}/{key}"
            total.metrics[full] = float(value)
        total.summary += result.summary
        total.files += result.files
    return total


@gin.configurable("experiment", denylist=["ctx"])
def experiment(
    ctx: Context,
    backbone: Callable[[], torch.nn.Module] | None = None,
    task: Callable[[], torch.nn.Module] | None = None,
    trainer: Any = None,
    evaluators: Sequence[Callable] = (),
    ckpt: str | None = None,
    weight_init: str = "virtex",
    compare_random_init: bool = False,
) -> EvalResult:
    """Pretrain ``task`` with ``trainer`` (if given), then run ``evaluators`` on the backbone.

    Without a task, the backbone comes from ``backbone()`` initialised from ``ckpt``
    as ``weight_init`` says (a directory ``ckpt`` is a sweep: :mod:`virtex.plan` makes it
    one run per checkpoint).
    ``compare_random_init`` also runs the evaluators on a randomly initialised
    backbone (metrics prefixed ``random_init/``). Returns every metric and summary line.
    """
    outcome = EvalResult()
    model, net, path = None, None, None
    if task is not None:
        if trainer is None:
            raise UserError("experiment.task is set but experiment.trainer is not")
        start = time.perf_counter()
        model = trainer.fit(task(), ctx)
        outcome.metrics["train/seconds"] = time.perf_counter() - start
        net = model.visual
    elif backbone is not None and ckpt is not None and Path(ckpt).is_dir():
        raise UserError(f"experiment.ckpt '{ckpt}' is a directory: a checkpoint sweep is a "
                        "plan of one run per checkpoint (python -m virtex.run expands it)")
    elif backbone is not None:
        net = backbone()
        load_backbone_weights(net, ckpt, weight_init)
        path = Path(ckpt) if ckpt is not None else None
        if path is not None:
            real = path.resolve()
            ctx.info(f"backbone: {weight_init} weights from {path}"
                     + (f" (a link to {real})" if real != path.absolute() else ""))
    elif evaluators:
        raise UserError("experiment.evaluators need experiment.backbone or experiment.task")
    else:
        raise UserError("experiment runs nothing: bind experiment.task (pretraining) or "
                        "experiment.evaluators")
    if net is not None:
        net.to(ctx.device)
    results = []
    if evaluators:
        results.append(_evaluate(evaluators, _request(ctx, net, model, path)))
    if compare_random_init and backbone is not None and evaluators:
        _seed_everything(ctx.seed + 1)
        results.append(_evaluate(evaluators, _request(ctx, backbone().to(ctx.device)),
                                 prefix="random_init/"))
    for result in results:
        outcome.metrics.update(result.metrics)
        outcome.summary += result.summary
        outcome.files += result.files
    return outcome


def format_table(metrics: dict[str, float]) -> str:
    """Headline metrics as a table; ``random_init/`` metrics become a second column.

    Per-class details (keys with more than one ``/``) stay in ``metrics.json``.
    """
    main = {k: v for k, v in metrics.items() if is_headline(k)}
    if not main:
        return "(no metrics)"
    random_init = {k: metrics.get(f"random_init/{k}") for k in main}
    width = max(len(k) for k in main)
    if any(v is not None for v in random_init.values()):
        lines = [f"| {'metric':<{width}} | {'this run':>10} | {'random init':>11} |",
                 f"|{'-' * (width + 2)}|{'-' * 12}|{'-' * 13}|"]
        for k, v in main.items():
            r = random_init[k]
            lines.append(f"| {k:<{width}} | {v:>10.2f} | {'' if r is None else f'{r:.2f}':>11} |")
    else:
        lines = [f"| {'metric':<{width}} | {'value':>10} |", f"|{'-' * (width + 2)}|{'-' * 12}|"]
        lines += [f"| {k:<{width}} | {v:>10.4f} |" for k, v in main.items()]
    return "\n".join(lines)
