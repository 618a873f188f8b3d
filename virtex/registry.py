"""Plugin discovery and the component registries.

One registry per extension point (``backbones``, ``evaluators``, ...). Plugins are
found through the ``virtex`` entry-point group only; built-in plugins are listed
in virtex's own ``pyproject.toml`` like any third-party package's.

Hooks are called through pluggy, one plugin at a time (``pm.subset_hook_caller``), so that
what each plugin registered stays known while pluggy's ordering (``tryfirst``, then the
last registered plugin first, then ``trylast``), its tracing (``pm.enable_tracing()``) and
its hook wrappers apply. A hook that raises or returns something else than a mapping is one
error naming the plugin. What a factory builds is checked against its kind's protocol
(:mod:`virtex.contracts`).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import gin
import pluggy

from virtex import contracts, hookspecs
from virtex.checks import checked
from virtex.errors import UserError, one_line

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


def _configurable(kind: str, name: str, factory: Callable, plugin: str) -> Callable:
    key = (kind, name)
    if key in _GIN_REGISTERED:
        original, wrapped = _GIN_REGISTERED[key]
        if original is factory:
            return wrapped
        raise UserError(
            f"{kind}.{name} is already registered in this process by another factory "
            f"({original.__module__}.{original.__qualname__})"
        )
    label = f"{kind}.{name} from plugin '{plugin}'"
    built = contracts.checked_build(checked(factory, f"{kind}.{name}"), kind, label)
    wrapped = gin.external_configurable(built, name=name, module=kind)
    _GIN_REGISTERED[key] = (factory, wrapped)
    return wrapped


class Registry:
    """Every component registered by the loaded plugins, by kind and name."""

    def __init__(self, pm: pluggy.PluginManager, failures: Iterable[PluginFailure] = ()):
        self.pm = pm
        self.failures = list(failures)
        self._components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        for kind in KINDS:
            for plugin, result in call_hook(pm, f"virtex_{kind}"):
                if not isinstance(result, Mapping):
                    raise UserError(f"plugin '{plugin}': virtex_{kind}() returned "
                                    f"{type(result).__name__}, expected a mapping name -> factory")
                for name, factory in result.items():
                    if not isinstance(name, str) or not callable(factory):
                        raise UserError(f"plugin '{plugin}': virtex_{kind}() maps {name!r} to "
                                        f"{type(factory).__name__}, expected a string name and "
                                        "a factory (a class or a function)")
                    self._add(kind, name, factory, plugin)

    def _add(self, kind: str, name: str, factory: Callable, plugin: str) -> None:
        existing = self._components[kind].get(name)
        if existing is not None:
            raise UserError(
                f"{kind}.{name} is registered twice: by plugin '{existing.plugin}' "
                f"and by plugin '{plugin}'"
            )
        wrapped = _configurable(kind, name, factory, plugin)
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
        for plugin, result in call_hook(self.pm, "virtex_spec_dirs"):
            if isinstance(result, (str, bytes, Path)) or not isinstance(result, Iterable):
                raise UserError(f"plugin '{plugin}': virtex_spec_dirs() returned "
                                f"{type(result).__name__}, expected a list of directories")
            for d in result:
                path = Path(d)
                if path not in dirs:
                    dirs.append(path)
        return dirs


def call_hook(pm: pluggy.PluginManager, name: str) -> list[tuple[str, object]]:
    """``(plugin name, result)`` of every plugin implementing hook ``name``, in pluggy's call
    order; each plugin is called through pluggy on its own (its wrappers included), and a
    plugin that raises is one :class:`UserError` naming it (the exception is its cause)."""
    impls = getattr(pm.hook, name).get_hookimpls()
    plain = [i for i in reversed(impls) if not (i.hookwrapper or i.wrapper)]  # call order
    out: list[tuple[str, object]] = []
    for impl in plain:
        caller = pm.subset_hook_caller(name, [i.plugin for i in plain if i is not impl])
        if [i for i in caller.get_hookimpls() if not (i.hookwrapper or i.wrapper)] != [impl]:
            raise UserError(f"plugin '{impl.plugin_name}': implements {name} under another "
                            f"function name (specname): name the function {name}")
        try:
            results = caller()
        except UserError as exc:
            raise UserError(f"plugin '{impl.plugin_name}': {one_line(exc)}") from exc
        except Exception as exc:
            raise UserError(f"plugin '{impl.plugin_name}': {name}() raised "
                            f"{type(exc).__name__}: {one_line(exc)}") from exc
        out += [(impl.plugin_name, r) for r in results]
    return out


def unknown_name_message(kind: str, name: str, available: list[str]) -> str:
    close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (
        f"unknown {kind} '{name}'.{hint} Available {kind}: {', '.join(available) or '(none)'}"
    )


def load_plugins(extra: Iterable[object] = ()) -> tuple[pluggy.PluginManager, list[PluginFailure]]:
    """Load every plugin of the ``virtex`` entry-point group (plus ``extra`` modules).

    A plugin that fails to import, or that pluggy rejects (a hook it implements with the
    wrong arguments, or a ``virtex_*`` function that is no hook: ``PluginValidationError``),
    is reported (plugin name and entry point) and skipped; the others still load.
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
        except Exception as exc:  # noqa: BLE001 - any import error is reported, not fatal
            failures.append(PluginFailure(ep.name, f"{ep.name} = {ep.value}", f"{type(exc).__name__}: {exc}"))
            continue
        failure = _register(pm, plugin, ep.name)
        if failure:
            failures.append(PluginFailure(ep.name, f"{ep.name} = {ep.value}", failure))
    for plugin in extra:
        failure = _register(pm, plugin, None)
        if failure:
            name = pm.get_canonical_name(plugin)
            failures.append(PluginFailure(name, f"(registered by the caller) {name}", failure))
    return pm, failures


def _register(pm: pluggy.PluginManager, plugin: object, name: str | None) -> str | None:
    """Register ``plugin``; pluggy's complaint about it (then it stays out), or None."""
    try:
        pm.register(plugin, name=name)
    except (pluggy.PluginValidationError, ValueError) as exc:  # ValueError: registered twice
        return f"{type(exc).__name__}: {exc}"
    try:
        pm.check_pending()  # every plugin before this one passed: the complaint is this one's
    except pluggy.PluginValidationError as exc:
        pm.unregister(plugin)
        return f"PluginValidationError: {exc}"
    return None


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
                f"failed to load and was skipped: {f.error}",
                file=sys.stderr,
            )
    return _REGISTRY
