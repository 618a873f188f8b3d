"""``python -m virtex.run SPEC [--gin_param NAME=VALUE ...]``: run any spec."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import gin

from virtex.config import available_specs
from virtex.contracts import Launcher, check_launch_result, label_of
from virtex.errors import UserError, one_line
from virtex.registry import KINDS, get_registry

DEFAULT_LAUNCHER = "local"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m virtex.run",
        description="Run a virtex spec (a gin file, or a spec name from a plugin's spec dir).",
        add_help=False,  # --help lists every launcher's options too: main() prints it
    )
    p.add_argument("spec", nargs="?", help="spec path or name, e.g. specs/quickstart.gin")
    p.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    p.add_argument("--gin_param", action="append", default=[], metavar="NAME=VALUE",
                   help="bind a value (repeatable); a bare path or word is taken as a string")
    p.add_argument("--run_dir", help="run directory (default runs/<spec>/<config hash>)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="resume from the run dir's newest checkpoint (default: yes)")
    p.add_argument("--print_config", action="store_true", help="print the config and exit")
    p.add_argument("--list", action="store_true", help="list every registered component")
    p.add_argument("--launcher", default=DEFAULT_LAUNCHER,
                   help=f"launcher plugin (default: {DEFAULT_LAUNCHER})")
    p.add_argument("--gpus", type=int, default=None,
                   help="processes per node (GPUs; on a CPU-only machine, gloo CPU processes)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                   help="one run per value, in RUN_DIR/NAME=V/ (repeatable: every combination); "
                        "with a checkpoint directory ckpt, every checkpoint x value; "
                        "RUN_DIR/sweep.csv collects them")
    return p


def _add_launcher_arguments(parser: argparse.ArgumentParser, name: str, launcher: Launcher) -> None:
    group = parser.add_argument_group(f"options of --launcher {name}")
    try:
        launcher.add_arguments(group)
    except argparse.ArgumentError as exc:
        raise UserError(f"launchers.{name}: add_arguments: {exc}") from None


def help_text() -> str:
    """``--help``: the CLI's options, then each registered launcher's."""
    registry = get_registry()
    parts = [_parser().format_help()]
    for name in registry.names("launchers"):
        parser = argparse.ArgumentParser(usage=argparse.SUPPRESS, add_help=False)
        _add_launcher_arguments(parser, name, registry.get("launchers", name)())
        parts.append(parser.format_help().strip() or f"options of --launcher {name}: none")
    return "\n\n".join(p.strip("\n") for p in parts) + "\n"


def list_components() -> str:
    registry = get_registry()
    lines = []
    for kind in KINDS:
        lines.append(f"{kind}:")
        for c in registry.components(kind):
            lines.append(f"  {kind + '.' + c.name:<40} (plugin: {c.plugin})")
    lines.append("specs:")
    for name in available_specs(registry.spec_dirs()):
        lines.append(f"  {name}")
    from virtex import zoo

    lines.append("published checkpoints (--gin_param ckpt=zoo:NAME; downloaded when named):")
    lines += [f"  {line}" for line in zoo.describe()]
    for f in registry.failures:
        lines.append(f"failed plugin: {f.plugin} ({f.entry_point}): {f.error}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        registry = get_registry()
        # which launcher (its options are not known yet), then the whole command line with
        # them: a launcher option's value is never mistaken for the spec, wherever it is
        first = _parser().parse_known_args(argv)[0]
        if first.help:
            print(help_text(), end="")
            return 0
        parser, launcher = _parser(), None
        if not first.list:
            launcher = registry.get("launchers", first.launcher)()
            _add_launcher_arguments(parser, first.launcher, launcher)
        args, extra = parser.parse_known_args(argv)
        if extra:
            raise UserError(f"unrecognized arguments: {' '.join(extra)} (python -m virtex.run "
                            "--help lists every option, by launcher)")
        if args.list:
            print(list_components())
            return 0
        if not args.spec:
            raise UserError("no spec given: python -m virtex.run SPEC (or --list)")
        for flag, value in (("--gpus", args.gpus), ("--nodes", args.nodes)):
            if value is not None and value < 1:
                raise UserError(f"{flag} {value}: expected a number >= 1")
        launcher.set_options(args)
        from virtex.experiment import check_config, expand, prepare
        from virtex.plan import parse_sweep

        sweeps = [parse_sweep(s) for s in args.sweep]

        job = prepare(args.spec, args.gin_param, args.run_dir, args.gpus, args.nodes, args.seed, argv)
        if args.print_config:
            print(gin.config_str(), end="")
            return 0
        check_config(job, gin.config_str())
        if not args.resume:  # checkpoints of the run or of its evaluators' training
            if any(Path(job.run_dir).rglob("step_*.pt")):
                raise UserError(f"{job.run_dir} already has checkpoints and --no-resume was given: "
                                "choose another --run_dir")
        plan = expand(job, sweeps)
        label = label_of(launcher, f"launchers.{args.launcher}")
        result = check_launch_result(launcher.launch(plan), label)
        summary = Path(job.run_dir) / "summary.md"
        # a launcher that only submitted the run (or printed a script) has no summary to show
        if result.returncode == 0 and result.finished and summary.is_file():
            print(summary.read_text(), end="")
            print(f"run directory: {job.run_dir}")
        return result.returncode
    except UserError as exc:
        print(f"virtex: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("virtex: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
