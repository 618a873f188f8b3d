"""Specs: finding them, parsing them with gin, and turning gin's errors into one line."""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import gin
from gin import config as gin_config
from gin import resource_reader as gin_resource_reader

from virtex.errors import UserError
from virtex.registry import KINDS, Registry, get_registry, unknown_name_message


def available_specs(spec_dirs: Iterable[Path]) -> list[str]:
    """Relative names (without ``.gin``) of every runnable spec in ``spec_dirs``."""
    names: set[str] = set()
    for d in spec_dirs:
        for p in Path(d).rglob("*.gin"):
            names.add(p.relative_to(d).with_suffix("").as_posix())
    return sorted(names)


def resolve_spec(spec: str, spec_dirs: Sequence[Path]) -> Path:
    """A spec given as a path, or as a name relative to a plugin's spec dir."""
    path = Path(spec)
    if path.is_file():
        return path.resolve()
    for d in spec_dirs:
        for candidate in (Path(d) / spec, Path(d) / f"{spec}.gin"):
            if candidate.is_file():
                return candidate.resolve()
    names = available_specs(spec_dirs)
    close = difflib.get_close_matches(spec.removesuffix(".gin").removeprefix("specs/"), names, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UserError(f"unknown spec '{spec}': no such file and no spec of that name.{hint}")


def spec_name(path: Path, spec_dirs: Sequence[Path]) -> str:
    """The name a run directory uses: relative to its spec dir, else the file stem."""
    for d in spec_dirs:
        try:
            return path.resolve().relative_to(Path(d).resolve()).with_suffix("").as_posix()
        except ValueError:
            continue
    return path.stem


def _where(message: str) -> str:
    """The 'In file "x", line N' part of a gin error message, if any."""
    m = re.search(r'In file "([^"]+)", line (\d+)', message)
    if m:
        return f"{m.group(1)}:{m.group(2)}"
    m = re.search(r"In bindings string line (\d+)", message)
    return f"binding line {m.group(1)}" if m else ""


def gin_error_message(exc: BaseException, registry: Registry | None = None) -> str:
    """One clear line for a gin parse or binding error."""
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    m = re.search(r"No configurable matching (?:reference )?'@?([\w.]+)", text)
    if m and registry is not None:
        parts = m.group(1).split(".")
        if len(parts) >= 2 and parts[0] in KINDS:
            first = unknown_name_message(parts[0], parts[1], registry.names(parts[0]))
    if isinstance(exc, SyntaxError) or type(exc).__name__ == "TokenError":
        first = f"syntax error: {first}"
    where = _where(text)
    return f"{where}: {first}" if where else first


def defined_macros() -> list[str]:
    return sorted(name for name, selector in gin_config._CONFIG if selector == "gin.macro")


def missing_required_macros() -> list[str]:
    missing = []
    for (name, selector), params in gin_config._CONFIG.items():
        if selector == "gin.macro" and repr(params.get("value")) == "%gin.REQUIRED":
            missing.append(name)
    return sorted(missing)


def normalize_param(param: str) -> tuple[str, str]:
    """Split ``name=value``; a value that is not a gin literal/reference is a string."""
    if "=" not in param:
        raise UserError(f"--gin_param '{param}': expected NAME=VALUE, e.g. trainer.max_steps=10")
    name, value = (s.strip() for s in param.split("=", 1))
    if not name or not value:
        raise UserError(f"--gin_param '{param}': expected NAME=VALUE, e.g. trainer.max_steps=10")
    if value.startswith(("@", "%")):  # a reference or a macro: gin resolves it
        return name, value
    parser = gin_config.config_parser.ConfigParser(f"{name} = {value}", gin_config.ParserDelegate())
    try:
        for _ in parser:
            pass
    except Exception:  # not a gin literal: take the text as a string
        value = repr(value)
    return name, value


def _package_file_exists(config_path: str) -> bool:
    """gin's check for an included file inside a Python package (``include 'a/b.gin'``
    looks for ``b.gin`` in package ``a``), except that a folder that is only a namespace
    package (no file of its own) holds none. gin's own check crashes on such a folder, and
    the working directory has one as soon as a run is written there: ``runs/``, which
    ``include 'runs/pretrain.gin'`` would then look into."""
    try:
        spec = importlib.util.find_spec(os.path.dirname(config_path).replace("/", "."))
    except (ImportError, ValueError):
        return False
    if spec is None or spec.origin is None:
        return False
    return gin_resource_reader.system_path_file_exists(config_path)


gin_config._FILE_READERS[:] = [
    (reader, _package_file_exists if check is gin_resource_reader.system_path_file_exists
     else check)
    for reader, check in gin_config._FILE_READERS
]


def parse_spec(
    spec_path: Path,
    params: Sequence[str],
    spec_dirs: Sequence[Path],
    registry: Registry,
    check_required: bool = True,
) -> list[str]:
    """Parse a spec and the command-line bindings into gin; returns the normalised bindings
    (``check_required=False``: a ``%gin.REQUIRED`` macro left unset is no error yet).

    The configurables it binds must be registered first: plugins' by the registry, the
    kernel's (``experiment``, ``trainer``, ``shapes_dir``) by importing
    :mod:`virtex.experiment`; :func:`load_spec` (below) is what callers use.
    """
    gin.clear_config()
    for d in spec_dirs:
        if str(d) not in gin_config._LOCATION_PREFIXES:
            gin.add_config_file_search_path(str(d))
    logging.disable(logging.ERROR)  # gin logs each include search-path miss
    try:
        gin.parse_config_file(str(spec_path))
    except OSError as exc:
        raise UserError(f"{spec_path}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # gin raises many kinds; each becomes one line
        msg = gin_error_message(exc, registry)
        if str(spec_path) not in msg and "In file" not in str(exc):
            msg = f"{spec_path}: {msg}"
        raise UserError(msg) from None
    finally:
        logging.disable(logging.NOTSET)
    macros = set(defined_macros())
    bindings = []
    for param in params:
        name, value = normalize_param(param)
        if "." not in name and "/" not in name and name not in macros:
            close = difflib.get_close_matches(name, sorted(macros), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise UserError(
                f"--gin_param '{param}': unknown binding '{name}': the spec defines no macro "
                f"of that name.{hint} Macros: {', '.join(sorted(macros)) or '(none)'}"
            )
        binding = f"{name} = {value}"
        try:
            gin.parse_config(binding)
        except Exception as exc:
            raise UserError(f"--gin_param '{param}': {gin_error_message(exc, registry)}") from None
        bindings.append(binding)
    missing = missing_required_macros() if check_required else []
    if missing:
        raise UserError(
            f"{spec_path.name} needs a value for {', '.join(missing)} (%gin.REQUIRED): "
            f"add --gin_param {missing[0]}=..."
        )
    return bindings


def load_spec(spec: str | Path, params: Sequence[str], registry: Registry | None = None) -> Path:
    """Resolve ``spec`` (a path or a spec name) and parse it and ``params`` into gin (the
    plugins' configurables are registered here; the kernel's by importing
    :mod:`virtex.experiment`, which every caller has); returns the spec's path."""
    registry = registry or get_registry()
    spec_dirs = registry.spec_dirs()
    path = resolve_spec(str(spec), spec_dirs)
    parse_spec(path, params, spec_dirs, registry)
    return path
