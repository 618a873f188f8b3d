"""The SLURM launcher: a run becomes a submitit job (a sweep, a job array), one task per GPU.

    python -m virtex.run SPEC --launcher slurm --gpus 8 --slurm_partition gpu --slurm_time 72:00:00

Each task calls :func:`virtex.experiment.run_job` with its rank from the SLURM
environment. Submitit's files, the logs and ``job.json`` (job id, tasks, sbatch
script) go to ``RUN_DIR/slurm/``.

Pre-emption and time limits: SLURM sends USR2 ``signal_delay_s`` before the
limit (or on ``scancel --signal=USR2``); submitit's handler calls
:meth:`SlurmTask.checkpoint` in the main thread, then requeues the job and exits.
The run itself is in a second thread, so ``checkpoint()`` can ask the trainer to
stop (the :class:`~virtex.train_hooks.StopRequest` hook the run's trainers get) and wait while
it saves at the step boundary; the requeued job resumes from that checkpoint (the runner
always resumes).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io as io_module
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import submitit

from virtex import io
from virtex.contracts import Arguments, LaunchResult
from virtex.errors import UserError
from virtex.experiment import Job, load_spec
from virtex.registry import get_registry

# key -> accepted types of the optional config file (~/.config/virtex/slurm.toml)
CONFIG_KEYS: dict[str, tuple[type, ...]] = {
    "partition": (str,), "account": (str,), "qos": (str,), "constraint": (str,),
    "time": (str, int), "cpus_per_task": (int,), "mem": (str,), "python": (str,),
    "setup": (list,), "sbatch": (dict,), "signal_delay_s": (int,), "max_requeues": (int,),
    "request_gpus": (bool,),
}
FLAGS = ("partition", "time", "account", "constraint", "qos")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED", "GONE"}
DEFAULT_TIME = 60  # minutes, when neither the config nor --slurm_time gives one


# -- settings -----------------------------------------------------------------------------
def config_path() -> Path:
    if os.environ.get("VIRTEX_SLURM_CONFIG"):
        return Path(os.environ["VIRTEX_SLURM_CONFIG"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "virtex" / "slurm.toml"


def load_config(path: Path | None = None) -> dict[str, Any]:
    """Lab defaults from ``$VIRTEX_SLURM_CONFIG`` or ``~/.config/virtex/slurm.toml`` (optional)."""
    explicit = path is not None or bool(os.environ.get("VIRTEX_SLURM_CONFIG"))
    path = path or config_path()
    if not path.is_file():
        if explicit:
            raise UserError(f"SLURM config '{path}' does not exist (set by VIRTEX_SLURM_CONFIG)")
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
    for key, value in data.items():
        if key not in CONFIG_KEYS:
            raise UserError(f"{path}: unknown key '{key}', expected one of {', '.join(CONFIG_KEYS)}")
        types = CONFIG_KEYS[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join({"str": "a string", "int": "an integer", "bool": "true or false",
                                 "list": "a list", "dict": "a table"}[t.__name__] for t in types)
            raise UserError(f"{path}: {key} = {value!r}: expected {names}")
    if "time" in data:
        parse_time(data["time"], f"{path}: time")
    return data


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time(value: str | int, what: str = "--slurm_time") -> int:
    """A SLURM time limit (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes."""
    if isinstance(value, int) and not isinstance(value, bool):
        minutes = value
    else:
        m = _TIME.match(str(value).strip())
        if not m:
            raise UserError(f"{what} '{value}': expected a SLURM time such as 72:00:00, 90 or 3-00:00:00")
        days, a, b, c = m.groups()
        if days is not None:
            minutes = int(days) * 1440 + int(a) * 60 + int(b or 0) + math.ceil(int(c or 0) / 60)
        elif b is None:
            minutes = int(a)
        elif c is None:
            minutes = int(a) + math.ceil(int(b) / 60)
        else:
            minutes = int(a) * 60 + int(b) + math.ceil(int(c) / 60)
    if minutes <= 0:
        raise UserError(f"{what} '{value}': the time limit must be at least one minute")
    return minutes


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
    name, _, values = text.partition("=")
    parts = split_values(values)
    if not name.strip() or not values or parts is None or any(not p for p in parts):
        raise UserError(f"--sweep '{text}': expected NAME=V1,V2,... (balanced brackets and quotes), "
                        "e.g. trainer.lr=0.1,0.2")
    return name.strip(), parts


@dataclass
class Member:
    """One task of a job array: its label (a directory name), job and summary columns."""

    label: str
    job: Job
    columns: dict[str, Any]


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", label.replace("'", "").replace('"', ""))[:120]


def checkpoint_sweep(job: Job) -> tuple[str, list[Path]] | None:
    """``(binding, checkpoints)`` when the spec evaluates a directory of checkpoints."""
    import gin

    from virtex.checkpoint import list_checkpoints

    load_spec(job.spec, job.params)
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


def array_members(job: Job, sweeps: list[tuple[str, list[str]]]) -> list[Member]:
    """The tasks of a job array: one per checkpoint of a ckpt directory times each ``--sweep``
    value (a cartesian product); none for a single run."""
    from virtex.checkpoint import step_of

    axes: list[list[tuple[str, dict[str, Any], str]]] = []
    found = checkpoint_sweep(job)
    if found:
        name, paths = found
        axes.append([(p.stem, {"step": step_of(p), "checkpoint": str(p)},
                      f"{name}={json.dumps(str(p))}") for p in paths])
    for name, values in sweeps:
        axes.append([(f"{name}={v}", {name: v}, f"{name}={v}") for v in values])
    if not axes:
        return []
    members: list[Member] = []
    for combo in itertools.product(*axes):
        label = ",".join(_safe(c[0]) for c in combo)
        if any(m.label == label for m in members):
            label = f"{label}-{len(members)}"
        params = [*job.params, *(c[2] for c in combo)]
        columns = {k: v for c in combo for k, v in c[1].items()}
        members.append(Member(label, replace(job, params=params, run_dir=str(Path(job.run_dir) / label)),
                              columns))
    return members


# -- what runs on the cluster ---------------------------------------------------------------
@dataclass
class SweepRecord:
    """The array's members, so that the last task to finish (or ``--wait``) writes the summary."""

    parent: str
    members: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def collect(self) -> bool:
        """Write ``sweep.csv`` and ``summary.md`` in the parent run dir once every task is done."""
        rows = []
        for label, run_dir, columns in self.members:
            path = Path(run_dir) / "metrics.json"
            if not path.is_file():
                return False
            rows.append((label, columns, json.loads(path.read_text())))
        parent = Path(self.parent)
        keys = list(dict.fromkeys(k for _, c, _ in rows for k in c))
        metrics = list(dict.fromkeys(k for _, _, m in rows for k in m))
        buffer = io_module.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["run", *keys, *metrics])
        for label, columns, values in rows:
            writer.writerow([label, *(columns.get(k, "") for k in keys), *(values.get(k, "") for k in metrics)])
        io.write_text(parent / "sweep.csv", buffer.getvalue())
        shown = [k for k in keys if k != "checkpoint"]
        headline = [k for k in metrics if k.count("/") <= 1 and not k.startswith("random_init/")]
        lines = ["| " + " | ".join(["run", *shown, *headline]) + " |",
                 "|" + "|".join("---" for _ in range(1 + len(shown) + len(headline))) + "|"]
        for label, columns, values in rows:
            cells = [label, *(str(columns.get(k, "")) for k in shown)]
            cells += [f"{values[k]:.4f}" if k in values else "" for k in headline]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"{len(rows)} runs in {parent}/<run>/; every metric in sweep.csv"]
        io.write_text(parent / "summary.md", "\n".join(lines) + "\n")
        return True


def _port(job_id: str) -> int:
    """The same on every task of a job; another after a requeue (the old one may linger)."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    return 20000 + (int(job_id) * 17 + restarts) % 20000


class SlurmTask(submitit.helpers.Checkpointable):
    """One SLURM task of a run: ``run_job`` in a thread, checkpoint-and-requeue on the signal."""

    def __init__(self, job: Job, sweep: SweepRecord | None = None, stop_timeout: float = 60.0):
        self.job, self.sweep, self.stop_timeout = job, sweep, stop_timeout

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __call__(self) -> dict[str, float]:
        from virtex.engine import Preempted
        from virtex.experiment import own_run_dir, run_job
        from virtex.train_hooks import StopRequest, training_hooks

        env = submitit.JobEnvironment()
        _only_this_process_checkpoints(env)
        rank, world_size, local_rank = env.global_rank, env.num_tasks, env.local_rank
        if self.job.gpus:
            import torch

            if torch.cuda.is_available() and local_rank >= torch.cuda.device_count():
                local_rank = 0  # the cluster binds one GPU to each task
        outcome: dict[str, Any] = {}
        self._stop = StopRequest()  # every rank's trainers check it (a collective)

        def target() -> None:
            try:  # rank 0 owns the run directory; a requeued job is the same SLURM job
                with own_run_dir(self.job) if rank == 0 else contextlib.nullcontext(), \
                        training_hooks(self._stop):
                    outcome["metrics"] = run_job(self.job, rank, world_size, local_rank,
                                                 env.hostnames[0], _port(env.raw_job_id))
            except BaseException as exc:  # handed to the main thread
                outcome["error"] = exc

        self._thread = threading.Thread(target=target, name="virtex-run", daemon=True)
        self._thread.start()
        while self._thread.is_alive():  # join with a timeout: the signal handler can run meanwhile
            self._thread.join(0.5)
        error = outcome.get("error")
        done = Path(env.paths.folder) / f"{env.job_id}_done.json"
        if isinstance(error, Preempted) and rank != 0:
            # rank 0 is requeueing the job: SLURM's SIGTERM ends this process (without it,
            # submitit ignores SIGTERM and SLURM waits KillWait seconds to kill it)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            time.sleep(self.stop_timeout)
        if error is not None:
            if rank == 0:
                io.write_json(done, {"state": "FAILED", "error": f"{type(error).__name__}: {error}"})
            raise error
        if rank == 0:
            io.write_json(done, {"state": "COMPLETED"})
            if self.sweep is not None and self.sweep.collect():
                print(f"all {len(self.sweep.members)} runs done: {self.sweep.parent}/summary.md", flush=True)
        return outcome["metrics"]

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on SLURM's signal (rank 0): save at the next step, then requeue."""
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.request()
        # submitit calls this on the very object it is running (its DelayedSubmission's function)
        thread = getattr(self, "_thread", None)
        if thread is not None and thread.is_alive():
            print(f"virtex: SLURM signal: checkpointing (waiting up to {self.stop_timeout:.0f} s)",
                  file=sys.stderr, flush=True)
            thread.join(self.stop_timeout)
            if thread.is_alive():
                print("virtex: no checkpoint at the signal (not training, or too slow): the requeued "
                      "job resumes from the newest one", file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(SlurmTask(self.job, self.sweep, self.stop_timeout))


def _only_this_process_checkpoints(env: submitit.JobEnvironment) -> None:
    """SLURM signals every process of the step; forked data-loader workers inherit
    submitit's handler and must not checkpoint and requeue the job themselves."""
    sig = env._usr_sig()
    original = signal.getsignal(sig)
    pid = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() == pid and callable(original):
            original(signum, frame)

    signal.signal(sig, handler)


# -- the launcher -----------------------------------------------------------------------------
class SlurmLauncher:
    """Submits runs to SLURM with submitit; ``--wait`` follows them to the end."""

    def __init__(self) -> None:
        self.flags: dict[str, str] = {}
        self.print_sbatch = False
        self.wait = False
        self.sweeps: list[tuple[str, list[str]]] = []

    def add_arguments(self, parser: Arguments) -> None:
        """``--slurm_partition`` ... ``--slurm_qos``, ``--sweep``, ``--print_sbatch``, ``--wait``."""
        for name in FLAGS:
            parser.add_argument(f"--slurm_{name}", metavar=name.upper(),
                                help=f"sbatch --{name}" + (" (SLURM's format, e.g. 72:00:00; "
                                                          "default 1 hour)" if name == "time" else ""))
        parser.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                            help="a job array, one task per value (repeatable: every combination)")
        parser.add_argument("--print_sbatch", action="store_true",
                            help="print the sbatch script that would be submitted; submit nothing")
        parser.add_argument("--wait", action="store_true",
                            help="follow the job's log until it ends, then print the summary")

    def set_options(self, options: argparse.Namespace) -> None:
        """Takes the values of the options :meth:`add_arguments` added (checked)."""
        self.flags = {k: getattr(options, f"slurm_{k}") for k in FLAGS
                      if getattr(options, f"slurm_{k}")}
        if "time" in self.flags:
            parse_time(self.flags["time"])
        self.print_sbatch, self.wait = options.print_sbatch, options.wait
        self.sweeps = [parse_sweep(s) for s in options.sweep]

    def parameters(self, job: Job, settings: dict[str, Any]) -> dict[str, Any]:
        """submitit's ``update_parameters`` for ``job``."""
        tasks = max(1, job.gpus or 1)
        params: dict[str, Any] = {
            "job_name": "virtex-" + _safe(job.spec_name.replace("/", "-")),
            "time": parse_time(settings.get("time", DEFAULT_TIME)),
            "nodes": job.nodes, "ntasks_per_node": tasks,
            "signal_delay_s": settings.get("signal_delay_s", 120),
        }
        if job.gpus and settings.get("request_gpus", True):
            params["gpus_per_node"] = job.gpus
        for key in ("partition", "account", "qos", "constraint", "cpus_per_task", "mem"):
            if settings.get(key) is not None:
                params[key] = settings[key]
        if settings.get("setup"):
            params["setup"] = [str(line) for line in settings["setup"]]
        if settings.get("sbatch"):
            params["additional_parameters"] = dict(settings["sbatch"])
        return params

    def launch(self, job: Job) -> LaunchResult:
        settings = {**load_config(), **self.flags}
        params = self.parameters(job, settings)
        members = array_members(job, self.sweeps)
        _validate(members)
        folder = Path(job.run_dir) / "slurm"
        python = settings.get("python") or sys.executable
        stop_timeout = max(10.0, params["signal_delay_s"] - 30.0)
        if self.print_sbatch:
            from submitit.slurm.slurm import _make_sbatch_string

            command = f"{shlex.quote(python)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
            print(_make_sbatch_string(command=command, folder=folder, map_count=len(members) or None,
                                      **params), end="")
            for i, m in enumerate(members):
                print(f"# array task {i}: {' '.join(m.job.params[len(job.params):])} -> {m.job.run_dir}")
            return LaunchResult(returncode=0, finished=False)
        for program in ("sbatch", "srun", "squeue"):
            if shutil.which(program) is None:
                raise UserError(f"{program} not found: the slurm launcher runs on a SLURM "
                                "cluster's login node, where sbatch, srun and squeue are on PATH "
                                "(--print_sbatch shows the script without submitting)")
        executor = submitit.SlurmExecutor(folder=folder, python=shlex.quote(python),
                                          max_num_timeout=settings.get("max_requeues", 10))
        try:
            executor.update_parameters(**params)
        except ValueError as exc:
            raise UserError(f"SLURM options: {str(exc).splitlines()[0]}") from None
        sweep = SweepRecord(job.run_dir, [(m.label, m.job.run_dir, m.columns) for m in members])
        try:
            if members:
                with executor.batch():
                    jobs = [executor.submit(SlurmTask(m.job, sweep, stop_timeout)) for m in members]
            else:
                jobs = [executor.submit(SlurmTask(job, None, stop_timeout))]
        except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError) as exc:
            raise UserError(f"sbatch failed: {' '.join(str(exc).split())[:300]}") from None
        job_id = jobs[0].job_id.split("_")[0]
        if members:
            tasks = [{"job_id": j.job_id, "label": m.label, "run_dir": m.job.run_dir}
                     for j, m in zip(jobs, members)]
        else:
            tasks = [{"job_id": job_id, "label": "", "run_dir": job.run_dir}]
        script = folder / f"{job_id}.sbatch"
        submitted = jobs[0].paths.submission_file
        io.write_text(script, submitted.read_text() if submitted.is_file() else "")
        record = {"job_id": job_id, "array": bool(members), "tasks": tasks, "sbatch": str(script),
                  "command": job.command, "submitted": time.strftime("%Y-%m-%d %H:%M:%S")}
        io.write_json(folder / "job.json", record)
        what = f"job array {job_id} ({len(jobs)} tasks)" if members else f"job {job_id}"
        print(f"submitted SLURM {what}: {params['nodes']} node(s) x {params['ntasks_per_node']} task(s), "
              f"time limit {params['time']} min")
        logs = f"{folder}/{job_id}{'_*' if members else ''}_0_log.{{out,err}}"
        print(f"logs: {logs}")
        print(f"run directory: {job.run_dir}")
        if not self.wait:
            print(f"state: squeue -j {job_id}")
            return LaunchResult(returncode=0, finished=False, job_id=job_id, output=logs)
        rc = follow(record, [_log_paths(folder, t["job_id"]) for t in tasks], sweep if members else None)
        return LaunchResult(returncode=rc, finished=True, job_id=job_id, output=logs)


def _validate(members: list[Member]) -> None:
    """Every array task's bindings parse (one clear error now rather than N failed tasks)."""
    registry = get_registry()
    for m in members:
        load_spec(m.job.spec, m.job.params, registry)


# -- following a submitted job -------------------------------------------------------------------
def _log_paths(folder: Path, job_id: str) -> tuple[Path, Path]:
    return folder / f"{job_id}_0_log.out", folder / f"{job_id}_0_log.err"


def job_states(job_id: str) -> dict[str, str] | None:
    """``{task job id: state}`` from ``squeue`` (no accounting database needed); ``{}`` once
    SLURM forgot the job, ``None`` if the controller did not answer."""
    try:
        r = subprocess.run(["squeue", "-h", "-r", "--states=all", "-j", job_id, "-o", "%i|%T"],
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    if r.returncode != 0:
        return {} if "Invalid job id" in r.stderr else None
    return dict(line.split("|", 1) for line in r.stdout.split())


class _Tail:
    """New complete lines of a log file; ``virtex_only`` keeps the ``virtex:`` lines (warnings,
    the signal) of a stderr log and drops submitit's chatter and tracebacks."""

    def __init__(self, path: Path, prefix: str, virtex_only: bool = False):
        self.path, self.prefix, self.virtex_only, self.offset = path, prefix, virtex_only, 0

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].decode(errors="replace").splitlines():
            if not self.virtex_only or line.startswith("virtex:"):
                print(f"{self.prefix}{line}", file=sys.stderr if self.virtex_only else sys.stdout,
                      flush=True)


def follow(record: dict[str, Any], logs: list[tuple[Path, Path]], sweep: SweepRecord | None,
           interval: float = 1.0) -> int:
    """Print the tasks' logs until every task has ended; 0 if all completed."""
    tasks = record["tasks"]
    tails = []
    for t, (out, err) in zip(tasks, logs):
        prefix = f"[{t['label']}] " if t["label"] else ""
        tails += [_Tail(out, prefix), _Tail(err, prefix, virtex_only=True)]
    folder = Path(record["sbatch"]).parent
    seen: dict[str, str] = {}
    misses = 0
    while True:
        for tail in tails:
            tail.poll()
        states = job_states(record["job_id"])
        if states is None:
            misses += 1
            if misses * interval > 300:
                raise UserError(f"squeue has not answered for 5 minutes: job {record['job_id']} "
                                f"keeps running; logs in {folder}")
            time.sleep(interval)
            continue
        misses = 0
        for t in tasks:
            state = states.get(t["job_id"]) or _marker(folder, t["job_id"]).get("state", "GONE")
            if seen.get(t["job_id"]) != state:
                print(f"virtex: SLURM job {t['job_id']}: {state}", flush=True)
                seen[t["job_id"]] = state
        if all(s in TERMINAL for s in seen.values()):
            break
        time.sleep(interval)
    for tail in tails:
        tail.poll()
    if sweep is not None:
        sweep.collect()
    failed = 0
    for t, (_, err) in zip(tasks, logs):
        if seen[t["job_id"]] != "COMPLETED":
            failed += 1
            lines = [x for x in err.read_text(errors="replace").splitlines() if x.strip()] \
                if err.is_file() else []
            reason = _marker(folder, t["job_id"]).get("error") or (lines[-1] if lines else "no log")
            print(f"virtex: error: SLURM job {t['job_id']} {seen[t['job_id']]}: "
                  f"{reason.splitlines()[0]} (log: {err})", file=sys.stderr)
    return 1 if failed else 0


def _marker(folder: Path, job_id: str) -> dict[str, str]:
    """What a task recorded when it ended (``state``, ``error``), ``{}`` if nothing."""
    path = folder / f"{job_id}_done.json"
    return json.loads(path.read_text()) if path.is_file() else {}
