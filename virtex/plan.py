"""Plans: what one command runs, as steps with dependencies; launchers only place them.

:func:`expand` turns a prepared :class:`~virtex.job.Job` into a :class:`Plan`:

- a single run: one step;
- a checkpoint directory (``ckpt=DIR``) and/or ``--sweep NAME=V1,V2,...``: one step per
  checkpoint x value (every combination), each in ``RUN_DIR/<label>/``; when the last one
  is done, :func:`collect` writes ``RUN_DIR/sweep.csv`` (one format, whichever launcher),
  ``RUN_DIR/summary.md`` and the metric-against-step curve to ``RUN_DIR/tensorboard``;
- a pipeline spec (binds ``pipeline.*``, see :mod:`virtex.pipeline`): its stages.

A step is a run plus actions done before and after it by whichever process runs the step
(:func:`perform`): wait until the checkpoint it evaluates is written, choose the best
checkpoint, collect a sweep, write the report. The local launcher runs the steps in
order in this process; the SLURM launcher submits each group of steps as one job (an
array for several) with ``afterok`` dependencies on the groups named in ``after``. A
step whose run directory holds ``metrics.json`` is finished and is not run again.
"""

from __future__ import annotations

import csv
import io as io_module
import itertools
import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from virtex import io
from virtex.errors import UserError
from virtex.job import Job
from virtex.report import is_headline
from virtex.report import write as write_report


@dataclass
class Action:
    """Something a step does before or after its run: ``name`` is one of :data:`ACTIONS`."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    """One run of a plan. ``group``: the steps of one group are one SLURM job (an array for
    several); ``after``: groups that must have succeeded first; ``starts_after``: groups that
    must have started (the step waits for what they write, see ``before``); ``columns``:
    this step's cells in ``sweep.csv``; ``resources``: the scheduler's settings for it
    (``gpus``, ``time``, ``array_parallelism``, ...), which the local launcher ignores;
    ``outputs``: files a finished run has written besides its ``metrics.json`` (a
    pretraining run's last checkpoint: with more steps bound, it is not finished)."""

    name: str
    job: Job
    group: str = ""
    after: list[str] = field(default_factory=list)
    starts_after: list[str] = field(default_factory=list)
    before: list[Action] = field(default_factory=list)
    then: list[Action] = field(default_factory=list)
    columns: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.group = self.group or self.name

    def finished(self) -> bool:
        return all(Path(p).is_file() for p in
                   [Path(self.job.run_dir) / "metrics.json", *self.outputs])


@dataclass
class Plan:
    """The steps of one command, in an order that respects their dependencies.
    ``run_dir``: the command's directory (a single run's, or the parent of the steps');
    ``kind``: ``run``, ``sweep`` or ``pipeline``."""

    run_dir: str
    steps: list[Step]
    kind: str = "run"
    command: str = ""
    shared: list[str] = field(default_factory=list)  # the bindings every step was given
    config: str = ""  # a pipeline's own config (its spec's bindings), kept as config.gin

    def groups(self) -> list[tuple[str, list[Step]]]:
        out: dict[str, list[Step]] = {}
        for step in self.steps:
            out.setdefault(step.group, []).append(step)
        return list(out.items())

    def record(self) -> None:
        """``RUN_DIR/plan.json``: every step's name, run directory, bindings and dependencies
        (what ``python -m virtex.report`` and a person read; not read back to run)."""
        if self.kind == "run":
            return
        rows = [{"name": s.name, "group": s.group, "spec": s.job.spec, "run_dir": s.job.run_dir,
                 "params": s.job.params, "after": s.after, "starts_after": s.starts_after,
                 "resources": s.resources} for s in self.steps]
        io.write_json(Path(self.run_dir) / "plan.json",
                      {"kind": self.kind, "command": self.command, "steps": rows})
        if self.config:
            io.write_text(Path(self.run_dir) / "config.gin", self.config)


def single(job: Job) -> Plan:
    """The plan of one run."""
    return Plan(job.run_dir, [Step(job.spec_name, job)], "run", job.command)


# -- --sweep NAME=V1,V2 and checkpoint directories --------------------------------------------
def split_values(text: str) -> list[str] | None:
    """``0.1,0.2`` or ``[1,2],[3]``: commas inside brackets or quotes do not split
    (``None`` if the brackets or quotes are unbalanced)."""
    parts, current, depth, quote = [], "", 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    parts.append(current.strip())
    return None if depth or quote else parts


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """``--sweep NAME=V1,V2,...`` as ``(NAME, [V1, V2, ...])``."""
    name, _, values = text.partition("=")
    parts = split_values(values)
    if not name.strip() or not values or parts is None or any(not p for p in parts):
        raise UserError(f"--sweep '{text}': expected NAME=V1,V2,... (balanced brackets and quotes), "
                        "e.g. trainer.lr=0.1,0.2")
    return name.strip(), parts


def safe_label(label: str) -> str:
    """``label`` as a directory or file name (at most 120 characters)."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", label.replace("'", "").replace('"', ""))[:120]


def checkpoint_directory() -> tuple[str, list[Path]] | None:
    """``(binding, checkpoints)`` when the parsed spec evaluates a directory of checkpoints
    (``experiment.ckpt``, or the macro it names, is a directory)."""
    import gin

    from virtex.checkpoint import list_checkpoints

    try:
        value, name = gin.query_parameter("experiment.ckpt"), "experiment.ckpt"
        while repr(value).startswith("%"):  # a macro: bind the macro itself
            name = repr(value)[1:]
            value = gin.query_parameter(repr(value))
    except ValueError:
        return None
    try:
        if gin.query_parameter("experiment.task") is not None:
            return None  # a pretraining run: ckpt is not what it evaluates
    except ValueError:
        pass
    if not isinstance(value, str) or not Path(value).is_dir():
        return None
    paths = list_checkpoints(Path(value))
    if not paths:
        raise UserError(f"checkpoint directory '{value}' holds no step_*.pt checkpoints")
    return name, [p.resolve() for p in paths]


def sweep_steps(job: Job, sweeps: Sequence[tuple[str, list[str]]],
                found: tuple[str, list[Path]] | None) -> list[Step]:
    """One step per checkpoint of ``found`` times each ``--sweep`` value (every
    combination), each in ``job.run_dir/<label>``; none for a single run."""
    from virtex.checkpoint import step_of

    axes: list[list[tuple[str, dict[str, Any], str]]] = []
    if found:
        name, paths = found
        axes.append([(p.stem, {"step": step_of(p), "checkpoint": str(p)},
                      f"{name}={json.dumps(str(p))}") for p in paths])
    for name, values in sweeps:
        axes.append([(f"{name}={v}", {name: v}, f"{name}={v}") for v in values])
    if not axes:
        return []
    steps: list[Step] = []
    for combo in itertools.product(*axes):
        label = ",".join(safe_label(c[0]) for c in combo)
        if any(s.name == label for s in steps):
            label = f"{label}-{len(steps)}"
        params = [*job.params, *(c[2] for c in combo)]
        run_dir = str(Path(job.run_dir) / label)
        steps.append(Step(label, replace(job, params=params, run_dir=run_dir), group="sweep",
                          columns={k: v for c in combo for k, v in c[1].items()}))
    members = [[s.name, s.job.run_dir, s.columns] for s in steps]
    for s in steps:
        s.then.append(Action("collect", {"parent": job.run_dir, "members": members}))
    return steps


# -- what steps do before and after their run ----------------------------------------------------
def perform(actions: Sequence[Action]) -> None:
    """Do ``actions`` in order (in the process that runs the step; rank 0)."""
    for action in actions:
        if action.name not in ACTIONS:
            raise UserError(f"plan action '{action.name}': expected one of {', '.join(ACTIONS)}")
        ACTIONS[action.name](**action.args)


def wait_for(path: str, producer: str, every: float = 5.0) -> None:
    """Wait until ``path`` (a checkpoint the producing run writes) exists; an error if the
    producer finished or failed without writing it."""
    target, source = Path(path), Path(producer)
    announced = False
    while not target.is_file():
        if (source / "metrics.json").is_file() or (source / "failed.json").is_file():
            if target.is_file():
                break
            how = "finished" if (source / "metrics.json").is_file() else "failed"
            raise UserError(f"{target} was never written: the run in {source} {how} without it")
        if not announced:
            print(f"virtex: waiting for {target} (written by the run in {source})", flush=True)
            announced = True
        time.sleep(every)


def _headline(metrics: Sequence[str]) -> list[str]:
    return [k for k in metrics if is_headline(k)]


def collect(parent: str, members: Sequence[Sequence[Any]], curve_dir: str | None = None) -> bool:
    """Once every member ``(label, run_dir, columns)`` has its ``metrics.json``: write
    ``sweep.csv`` (``run``, the columns, every metric), ``summary.md`` and, when the members
    have a ``step``, the curve of each headline metric against step to ``curve_dir``
    (default ``parent/tensorboard``). False while a member is not done."""
    rows = []
    for label, run_dir, columns in members:
        path = Path(run_dir) / "metrics.json"
        if not path.is_file():
            return False
        rows.append((label, columns, json.loads(path.read_text())))
    out = Path(parent)
    keys = list(dict.fromkeys(k for _, c, _ in rows for k in c))
    metrics = list(dict.fromkeys(k for _, _, m in rows for k in m))
    buffer = io_module.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", *keys, *metrics])
    for label, columns, values in rows:
        writer.writerow([label, *(columns.get(k, "") for k in keys),
                         *(values.get(k, "") for k in metrics)])
    io.write_text(out / "sweep.csv", buffer.getvalue())
    shown = [k for k in keys if k != "checkpoint"]
    headline = _headline(metrics)
    lines = ["| " + " | ".join(["run", *shown, *headline]) + " |",
             "|" + "|".join("---" for _ in range(1 + len(shown) + len(headline))) + "|"]
    for label, columns, values in rows:
        cells = [label, *(str(columns.get(k, "")) for k in shown)]
        cells += [f"{values[k]:.4f}" if k in values else "" for k in headline]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{len(rows)} runs in {out}/<run>/; every metric in sweep.csv"]
    io.write_text(out / "summary.md", "\n".join(lines) + "\n")
    if "step" in keys and len({c.get("step") for _, c, _ in rows}) == len(rows):
        points = {k: [(int(c["step"]), float(v[k])) for _, c, v in rows if k in v]
                  for k in headline}
        write_curve(Path(curve_dir) if curve_dir else out / "tensorboard", points,
                    tag=safe_label(out.name) or "sweep")
    return True


def write_curve(directory: Path, points: dict[str, list[tuple[int, float]]], tag: str) -> Path:
    """The scalars ``points`` (name -> (step, value)) as one tensorboard events file in
    ``directory``, named for ``tag`` and replaced whole on each call (never appended twice)."""
    from torch.utils.tensorboard import SummaryWriter

    directory.mkdir(parents=True, exist_ok=True)
    # named to be read after the run's own events files (tensorboard reads them in name order)
    target = directory / f"events.out.tfevents.9999999999.{tag}.curve"
    with tempfile.TemporaryDirectory(dir=directory, prefix=".curve-") as tmp:
        writer = SummaryWriter(tmp)
        for name, series in points.items():
            for step, value in sorted(series):
                writer.add_scalar(name, value, step)
        writer.close()
        (written,) = Path(tmp).iterdir()
        os.replace(written, target)
    return target


def select(sweep: str, metric: str, out: str, steps: Sequence[int | None] | None = None) -> dict:
    """Choose the best checkpoint of ``sweep`` (a ``sweep.csv``) by ``metric`` (the
    highest; ties: the later step), within ``steps = (first, last)`` if given: writes
    ``out/best.json`` and the link ``out/best.pt`` to its file. Returns the choice."""
    path = Path(sweep)
    if not path.is_file():
        raise UserError(f"cannot choose the best checkpoint: {path} does not exist (the "
                        "checkpoint sweep has not finished)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and metric not in rows[0]:
        raise UserError(f"cannot choose the best checkpoint: {path} has no column '{metric}' "
                        f"(columns: {', '.join(rows[0])}); set pipeline.select_metric")
    first, last = (list(steps) + [None, None])[:2] if steps else (None, None)
    rows = [r for r in rows if r.get(metric) not in (None, "")
            and (first is None or int(r["step"]) >= first)
            and (last is None or int(r["step"]) <= last)]
    if not rows:
        raise UserError(f"cannot choose the best checkpoint: no row of {path} has '{metric}' "
                        f"in the step range {first}..{last}")
    best = max(rows, key=lambda r: (float(r[metric]), int(r["step"])))
    choice = {"step": int(best["step"]), "checkpoint": best["checkpoint"], "metric": metric,
              "value": float(best[metric])}
    where = Path(out)
    link = where / "best.pt"
    temporary = where / f".best.pt.{os.getpid()}.tmp"
    temporary.unlink(missing_ok=True)
    os.symlink(os.path.relpath(best["checkpoint"], where), temporary)
    os.replace(temporary, link)
    io.write_json(where / "best.json", choice)
    return choice


def report(run_dir: str) -> None:
    """The pipeline's ``summary.md`` (every stage's headline metrics) and the report."""
    root = Path(run_dir)
    plan = json.loads((root / "plan.json").read_text())
    best = root / "best.json"
    chosen = json.loads(best.read_text()) if best.is_file() else None
    lines = ["| stage | metric | value |", "|---|---|---|"]
    for row in plan["steps"]:
        metrics = Path(row["run_dir"]) / "metrics.json"
        if row["group"] != row["name"] or not metrics.is_file():
            continue
        values = json.loads(metrics.read_text())
        for key in _headline(values):
            if not key.startswith("train/"):
                lines.append(f"| {row['name']} | {key} | {values[key]:.2f} |")
    if chosen:
        lines += ["", f"chosen checkpoint: step {chosen['step']} ({chosen['metric']} "
                      f"{chosen['value']:.2f}): {chosen['checkpoint']}"]
    io.write_text(root / "summary.md", "\n".join(lines) + "\n")
    write_report(root)


ACTIONS = {"wait_for": wait_for, "collect": collect, "select": select, "report": report}
