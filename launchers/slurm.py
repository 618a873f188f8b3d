"""The SLURM launcher: each group of a plan's steps becomes a submitit job (several steps:
a job array), one task per GPU, with ``afterok``/``after`` dependencies between groups.

    python -m virtex.run SPEC --launcher slurm --gpus 8 --slurm_partition gpu --slurm_time 72:00:00

Each task does its step's actions and calls :func:`virtex.experiment.run_job` with its
rank from the SLURM environment. Submitit's files, the logs and ``job.json`` (the job id
of every group, the tasks, the sbatch script) go to ``RUN_DIR/slurm/``.

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
from dataclasses import replace
from pathlib import Path
from typing import Any

import submitit

from virtex import io
from virtex.contracts import Arguments, LaunchResult
from virtex.errors import UserError
from virtex.experiment import Job
from virtex.plan import Plan, Step, perform, safe_label

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


def _port(job_id: str) -> int:
    """The same on every task of a job; another after a requeue (the old one may linger)."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    return 20000 + (int(job_id) * 17 + restarts) % 20000


class SlurmTask(submitit.helpers.Checkpointable):
    """One SLURM task of a plan's step: its actions and ``run_job`` in a thread,
    checkpoint-and-requeue on the signal."""

    def __init__(self, step: Step, stop_timeout: float = 60.0):
        self.step, self.stop_timeout = step, stop_timeout

    @property
    def job(self) -> Job:
        return self.step.job

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
        failed = Path(self.job.run_dir) / "failed.json"

        def target() -> None:
            try:  # rank 0 owns the run directory and does the step's actions
                if rank == 0:
                    failed.unlink(missing_ok=True)
                    perform(self.step.before)
                with own_run_dir(self.job) if rank == 0 else contextlib.nullcontext(), \
                        training_hooks(self._stop):
                    outcome["metrics"] = run_job(self.job, rank, world_size, local_rank,
                                                 env.hostnames[0], _port(env.raw_job_id))
                if rank == 0:
                    perform(self.step.then)
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
                reason = f"{type(error).__name__}: {error}"
                io.write_json(done, {"state": "FAILED", "error": reason})
                if not isinstance(error, Preempted):  # what a step waiting for it reads
                    io.write_json(failed, {"job_id": env.job_id, "error": reason})
            raise error
        if rank == 0:
            io.write_json(done, {"state": "COMPLETED"})
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
        return submitit.helpers.DelayedSubmission(SlurmTask(self.step, self.stop_timeout))


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
# what a pipeline stage's resources may set (pipeline.resources), besides the config's keys
RESOURCE_KEYS = ("gpus", "nodes", "time", "partition", "account", "qos", "constraint",
                 "cpus_per_task", "mem", "array_parallelism")
RUNNING = {"PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED",
           "COMPLETING", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}


class SlurmLauncher:
    """Submits a plan's steps to SLURM with submitit: each group of steps one job (a job
    array for several), with ``afterok`` dependencies; ``--wait`` follows them to the end."""

    def __init__(self) -> None:
        self.flags: dict[str, str] = {}
        self.print_sbatch = False
        self.wait = False

    def add_arguments(self, parser: Arguments) -> None:
        """``--slurm_partition`` ... ``--slurm_qos``, ``--print_sbatch``, ``--wait``."""
        for name in FLAGS:
            parser.add_argument(f"--slurm_{name}", metavar=name.upper(),
                                help=f"sbatch --{name}" + (" (SLURM's format, e.g. 72:00:00; "
                                                          "default 1 hour)" if name == "time" else ""))
        parser.add_argument("--print_sbatch", action="store_true",
                            help="print the sbatch script(s) that would be submitted; submit nothing")
        parser.add_argument("--wait", action="store_true",
                            help="follow the jobs' logs until they end, then print the summary")

    def set_options(self, options: argparse.Namespace) -> None:
        """Takes the values of the options :meth:`add_arguments` added (checked)."""
        self.flags = {k: getattr(options, f"slurm_{k}") for k in FLAGS
                      if getattr(options, f"slurm_{k}")}
        if "time" in self.flags:
            parse_time(self.flags["time"])
        self.print_sbatch, self.wait = options.print_sbatch, options.wait

    def parameters(self, job: Job, settings: dict[str, Any]) -> dict[str, Any]:
        """submitit's ``update_parameters`` for ``job``."""
        tasks = max(1, job.gpus or 1)
        params: dict[str, Any] = {
            "job_name": "virtex-" + safe_label(job.spec_name.replace("/", "-")),
            "time": parse_time(settings.get("time", DEFAULT_TIME)),
            "nodes": job.nodes, "ntasks_per_node": tasks,
            "signal_delay_s": settings.get("signal_delay_s", 120),
        }
        if job.gpus and settings.get("request_gpus", True):
            params["gpus_per_node"] = job.gpus
        for key in ("partition", "account", "qos", "constraint", "cpus_per_task", "mem",
                    "array_parallelism"):
            if settings.get(key) is not None:
                params[key] = settings[key]
        if settings.get("setup"):
            params["setup"] = [str(line) for line in settings["setup"]]
        if settings.get("sbatch"):
            params["additional_parameters"] = dict(settings["sbatch"])
        return params

    def _placed(self, step: Step, settings: dict[str, Any]) -> tuple[Step, dict[str, Any]]:
        """``step`` with its stage's GPUs and nodes, and the sbatch settings for it
        (the config file, then the command line, then the stage's resources)."""
        extra = sorted(set(step.resources) - set(RESOURCE_KEYS))
        if extra:
            raise UserError(f"pipeline.resources['{step.group}']: unknown key '{extra[0]}', "
                            f"expected one of {', '.join(RESOURCE_KEYS)}")
        job = replace(step.job, gpus=step.resources.get("gpus", step.job.gpus),
                      nodes=step.resources.get("nodes", step.job.nodes))
        merged = {**settings, **{k: v for k, v in step.resources.items() if k not in ("gpus", "nodes")}}
        if "time" in step.resources:
            parse_time(step.resources["time"], f"pipeline.resources['{step.group}']['time']")
        return replace(step, job=job), merged

    def launch(self, plan: Plan) -> LaunchResult:
        settings = {**load_config(), **self.flags}
        folder = Path(plan.run_dir) / "slurm"
        python = settings.get("python") or sys.executable
        if self.print_sbatch:
            return self._print(plan, settings, folder, python)
        for program in ("sbatch", "srun", "squeue"):
            if shutil.which(program) is None:
                raise UserError(f"{program} not found: the slurm launcher runs on a SLURM "
                                "cluster's login node, where sbatch, srun and squeue are on PATH "
                                "(--print_sbatch shows the script without submitting)")
        plan.record()
        previous = _record(folder)
        ids: dict[str, str] = {}
        tasks: list[dict[str, Any]] = []
        first: dict[str, Any] = {}
        for group, steps in plan.groups():
            array = _is_array(plan, steps)
            # a single run is always submitted (it may have more steps to train now)
            todo = [s for s in steps if plan.kind == "run" or not s.finished()]
            if not todo:
                print(f"virtex: {group}: finished already, not submitted")
                for s in steps:
                    perform(s.then)
                continue
            known = previous.get("groups", {}).get(group)
            if known and _still_queued(known):
                print(f"virtex: {group}: SLURM job {known} is queued or running, not submitted again")
                ids[group] = known
                tasks += [t for t in previous.get("tasks", []) if t.get("group") == group]
                continue
            placed = [self._placed(s, settings) for s in todo]
            params = self.parameters(placed[0][0].job, placed[0][1])
            deps = _dependencies(todo[0], ids)
            if deps:  # a failed dependency cancels this job instead of leaving it pending
                params["dependency"] = ",".join(deps)
                params["additional_parameters"] = {**params.get("additional_parameters", {}),
                                                   "kill_on_invalid_dep": "yes"}
            stop_timeout = max(10.0, params["signal_delay_s"] - 30.0)
            executor = submitit.SlurmExecutor(folder=folder, python=shlex.quote(python),
                                              max_num_timeout=settings.get("max_requeues", 10))
            try:
                executor.update_parameters(**params)
            except ValueError as exc:
                raise UserError(f"SLURM options: {str(exc).splitlines()[0]}") from None
            try:
                if array:
                    with executor.batch():
                        jobs = [executor.submit(SlurmTask(s, stop_timeout)) for s, _ in placed]
                else:
                    jobs = [executor.submit(SlurmTask(placed[0][0], stop_timeout))]
            except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError) as exc:
                raise UserError(f"sbatch failed: {' '.join(str(exc).split())[:300]}") from None
            job_id = jobs[0].job_id.split("_")[0]
            ids[group] = job_id
            tasks += [{"job_id": j.job_id if array else job_id,
                       "label": s.name if array or plan.kind == "pipeline" else "",
                       "run_dir": s.job.run_dir, **({"group": group} if plan.kind != "run" else {})}
                      for j, (s, _) in zip(jobs, placed)]
            script = folder / f"{job_id}.sbatch"
            submitted = jobs[0].paths.submission_file
            io.write_text(script, submitted.read_text() if submitted.is_file() else "")
            first = first or {"job_id": job_id, "sbatch": str(script)}
            what = f"job array {job_id} ({len(jobs)} tasks)" if array else f"job {job_id}"
            after = f", after {params['dependency']}" if deps else ""
            print(f"submitted SLURM {what}{f' for {group}' if plan.kind == 'pipeline' else ''}: "
                  f"{params['nodes']} node(s) x {params['ntasks_per_node']} task(s), "
                  f"time limit {params['time']} min{after}")
        if not tasks:
            return LaunchResult(returncode=0, finished=True, output=plan.run_dir)
        job_id = first.get("job_id") or next(iter(ids.values()))
        array = any(_is_array(plan, steps) for _, steps in plan.groups())
        record = {"job_id": job_id, "array": array, "groups": ids, "tasks": tasks,
                  "sbatch": first.get("sbatch") or previous.get("sbatch", ""),
                  "command": plan.command, "submitted": time.strftime("%Y-%m-%d %H:%M:%S")}
        io.write_json(folder / "job.json", record)
        shown = job_id if len(ids) == 1 else "<job id>"
        logs = f"{folder}/{shown}{'_*' if array else ''}_0_log.{{out,err}}"
        print(f"logs: {logs}")
        print(f"run directory: {plan.run_dir}")
        if not self.wait:
            print(f"state: squeue -j {','.join(ids.values())}")
            return LaunchResult(returncode=0, finished=False, job_id=job_id, output=logs)
        rc = follow(record, [_log_paths(folder, t["job_id"]) for t in tasks])
        return LaunchResult(returncode=rc, finished=True, job_id=job_id, output=logs)

    def _print(self, plan: Plan, settings: dict[str, Any], folder: Path, python: str) -> LaunchResult:
        from submitit.slurm.slurm import _make_sbatch_string

        command = f"{shlex.quote(python)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
        for group, steps in plan.groups():
            array = _is_array(plan, steps)
            placed = [self._placed(s, settings) for s in steps]
            params = self.parameters(placed[0][0].job, placed[0][1])
            deps = _dependencies(steps[0], {g: f"<{g}>" for g, _ in plan.groups()})
            if plan.kind == "pipeline":
                print(f"# -- {group}" + (f" (dependency {','.join(deps)})" if deps else ""))
            print(_make_sbatch_string(command=command, folder=folder,
                                      map_count=len(steps) if array else None, **params), end="")
            if array:
                for i, s in enumerate(steps):
                    own = [p for p in s.job.params if p not in plan.shared]
                    print(f"# array task {i}: {' '.join(own)} -> {s.job.run_dir}")
        return LaunchResult(returncode=0, finished=False)


def _dependencies(step: Step, ids: dict[str, str]) -> list[str]:
    """sbatch ``--dependency`` terms of ``step``: ``afterok`` on the groups it needs done,
    ``after`` on those it needs started, for the groups that have a job in ``ids``."""
    return [f"{kind}:{ids[g]}" for kind, groups in (("afterok", step.after),
                                                    ("after", step.starts_after))
            for g in groups if g in ids]


def _is_array(plan: Plan, steps: list[Step]) -> bool:
    """A sweep's members, and a group of several steps, are one job array."""
    return plan.kind == "sweep" or len(steps) > 1


def _record(folder: Path) -> dict[str, Any]:
    path = folder / "job.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def _still_queued(job_id: str) -> bool:
    """Whether SLURM still has ``job_id`` (any task of an array) pending or running."""
    states = job_states(job_id)
    return bool(states) and any(state in RUNNING for state in states.values())


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


def follow(record: dict[str, Any], logs: list[tuple[Path, Path]], interval: float = 1.0) -> int:
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
        states = job_states(",".join(record.get("groups", {}).values()) or record["job_id"])
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
