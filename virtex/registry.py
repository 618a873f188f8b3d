"""Plugin discovery and the component registries.

One registry per extension point (``backbones``, ``evaluators``, ...). Plugins are
found through the ``virtex`` entry-point group only; built-in plugins are listed
in virtex's own ``pyproject.toml`` like any third-party package's.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import gin
import pluggy

from virtex import hookspecs
from virtex.checks import checked
from virtex.errors import UserError

ENTRY_POINT_GROUP = "virtex"
KINDS = (
    "backbones",
    "textual_heads",
    "tasks",
    "datasets",
    "transforms",
    "evaluators",
    "launchers",
    "train_hooks",
)

# (kind, name) -> (original factory, gin-configurable factory); gin allows a
# name to be registered once per process, so re-registration reuses the entry.
_GIN_REGISTERED: dict[tuple[str, str], tuple[Callable, Callable]] = {}


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    factory: Callable
    plugin: str


@dataclass(frozen=True)
class PluginFailure:
    plugin: str
    entry_point: str
    error: str


def _configurable(kind: str, name: str, factory: Callable) -> Callable:
    key = (kind, name)
    if key in _GIN_REGISTERED:
        original, wrapped = _GIN_REGISTERED[key]
        if original is factory:
            return wrapped
        raise UserError(
            f"{kind}.{name} is already registered in this process by another factory "
            f"({original.__module__}.{original.__qualname__})"
        )
    wrapped = gin.external_configurable(checked(factory, f"{kind}.{name}"), name=name,
                                        module=kind)
    _GIN_REGISTERED[key] = (factory, wrapped)
    return wrapped


class Registry:
    """Every component registered by the loaded plugins, by kind and name."""

    def __init__(self, pm: pluggy.PluginManager, failures: Iterable[PluginFailure] = ()):
        self.pm = pm
        self.failures = list(failures)
        self._components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        for kind in KINDS:
            caller = getattr(pm.hook, f"virtex_{kind}")
            for impl in caller.get_hookimpls():  # registration order
                result = impl.function()
                if not result:
                    continue
                for name, factory in result.items():
                    self._add(kind, name, factory, impl.plugin_name)

    def _add(self, kind: str, name: str, factory: Callable, plugin: str) -> None:
        existing = self._components[kind].get(name)
        if existing is not None:
            raise UserError(
                f"{kind}.{name} is registered twice: by plugin '{existing.plugin}' "
                f"and by plugin '{plugin}'"
            )
        wrapped = _configurable(kind, name, factory)
        self._components[kind][name] = Component(kind, name, wrapped, plugin)

    def names(self, kind: str) -> list[str]:
        return sorted(self._components[kind])

    def components(self, kind: str) -> list[Component]:
        return [self._components[kind][n] for n in self.names(kind)]

    def get(self, kind: str, name: str) -> Callable:
        """The gin-configurable factory for ``kind.name``; a clear error if unknown."""
        if kind not in self._components:
            raise UserError(f"unknown component kind '{kind}'; kinds are: {', '.join(KINDS)}")
        try:
            return self._components[kind][name].factory
        except KeyError:
            raise UserError(unknown_name_message(kind, name, self.names(kind))) from None

    def spec_dirs(self) -> list[Path]:
        dirs: list[Path] = []
        for impl in self.pm.hook.virtex_spec_dirs.get_hookimpls():
            for d in impl.function() or ():
                path = Path(d)
                if path not in dirs:
                    dirs.append(path)
        return dirs


def unknown_name_message(kind: str, name: str, available: list[str]) -> str:
    close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (
        f"unknown {kind} '{name}'.{hint} Available {kind}: {', '.join(available) or '(none)'}"
    )


def load_plugins(extra: Iterable[object] = ()) -> tuple[pluggy.PluginManager, list[PluginFailure]]:
    """Load every plugin of the ``virtex`` entry-point group (plus ``extra`` modules).

    A plugin that fails to import is reported (plugin name and entry point) and
    skipped; the others still load.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    failures: list[PluginFailure] = []
    seen: set[str] = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in seen or pm.has_plugin(ep.name):
            continue
        seen.add(ep.name)
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # noqa: BLE001 - any import error is reported, not fatal
            failures.append(PluginFailure(ep.name, f"{ep.name} = {ep.value}", f"{type(exc).__name__}: {exc}"))
    for plugin in extra:
        pm.register(plugin)
    return pm, failures


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry (plugins loaded once; failures reported on stderr)."""
    global _REGISTRY
    if _REGISTRY is None:
        pm, failures = load_plugins()
        _REGISTRY = Registry(pm, failures)
        for f in failures:
            print(
                f"virtex: warning: plugin '{f.plugin}' (entry point '{f.entry_point}') "
                f"failed to import and was skipped: {f.error}",
                file=sys.stderr,
            )
    return _REGISTRY


def build(kind: str, name: str, **kwargs: object) -> object:
    """Build a registered component by kind and name (spec bindings apply)."""
    return get_registry().get(kind, name)(**kwargs)
