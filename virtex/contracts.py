"""What a component must be: one :class:`typing.Protocol` per extension point, checked.

The registry builds every component through :func:`checked_build`: the object a factory
returns is checked against its kind's protocol (:data:`CONTRACTS`), and a mismatch is one
:class:`~virtex.errors.UserError` naming the component and what is missing::

    tasks.foo from plugin 'bar' built a Foo, not a virtex.contracts.Task: it has no attribute 'visual'

What only a call can show is checked at the first call: the dict a task's ``forward`` returns
(:func:`check_task_output`, by the trainer) and a launcher's :class:`LaunchResult`
(:func:`check_launch_result`, by ``virtex.run``).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from virtex.errors import UserError

if TYPE_CHECKING:
    import torch

    from virtex.plan import Plan


@runtime_checkable
class Backbone(Protocol):
    """A visual backbone (``backbones.*``): an ``nn.Module`` mapping images ``(N, 3, H, W)``
    to a feature map ``(N, out_channels, h, w)``."""

    out_channels: int
    """C, the channels of the feature map (what linear probes and heads are sized by)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...

    def parameters(self) -> Any: ...

    def state_dict(self) -> Mapping[str, Any]: ...


@runtime_checkable
class Task(Protocol):
    """A pretraining task (``tasks.*``): the ``nn.Module`` the trainer trains.

    ``forward(batch)`` returns a dict (checked at the first step, :func:`check_task_output`):

    - ``loss``: the scalar tensor to back-propagate (a mean over this rank's batch);
    - ``losses``: ``{name: scalar tensor}`` logged as ``loss/<name>`` (detached);
    - ``weight`` (optional): how many terms ``loss`` is the mean of on this rank (e.g. the
      caption tokens that are not padding), a number or a one-element tensor. Under DDP the
      trainer reports ``sum(loss * weight) / sum(weight)`` over the ranks and scales each
      rank's loss by ``weight * world_size / sum(weight)``, so that the averaged gradient is
      the gradient of the mean over the global batch, as in one process. Without it, every
      rank counts the same (right when each rank's loss is a mean over equally many terms).
    """

    visual: Backbone
    """The backbone being pretrained: what the evaluators transfer after training."""

    def __call__(self, batch: Mapping[str, Any]) -> Mapping[str, Any]: ...

    def parameters(self) -> Any: ...

    def state_dict(self) -> Mapping[str, Any]: ...


@runtime_checkable
class CaptioningTask(Task, Protocol):
    """A task that can also caption (what the captioning evaluators and the trainer's samples
    use; optional: a task with ``generate`` must have all of these)."""

    tokenizer: Any
    """The tokenizer its captions are encoded with (``decode(ids) -> str``)."""

    textual: Any
    """Its textual head."""

    def generate(self, images: torch.Tensor, **options: Any) -> list[list[int]]:
        """Token ids (without [SOS]/[EOS]) of one caption per image."""
        ...


@dataclass(frozen=True)
class LaunchResult:
    """What :meth:`Launcher.launch` returns.

    ``finished``: the run ended before ``launch`` returned (its ``summary.md`` is final),
    not only submitted or queued. ``job_id`` and ``output`` (where its logs go) for a
    scheduler's job.
    """

    returncode: int = 0
    finished: bool = True
    job_id: str | None = None
    output: str | None = None


class Arguments(Protocol):
    """An ``argparse`` parser or argument group: where a launcher adds its options."""

    def add_argument(self, *names: str, **options: Any) -> argparse.Action: ...


@runtime_checkable
class Launcher(Protocol):
    """A launcher (``launchers.*``): places the steps of a :class:`virtex.plan.Plan` (each a
    :class:`virtex.job.Job` plus the actions before and after it, see
    :func:`virtex.plan.perform`) in processes, each of which calls
    :func:`virtex.experiment.run_job`; it respects the steps' order and dependencies."""

    def add_arguments(self, parser: Arguments) -> None:
        """Add this launcher's own command-line options (``parser.add_argument``)."""
        ...

    def set_options(self, options: argparse.Namespace) -> None:
        """Take the parsed command line (this launcher's options are attributes of it);
        raise :class:`~virtex.errors.UserError` for a bad value."""
        ...

    def launch(self, plan: Plan) -> LaunchResult:
        """Run or submit ``plan`` (a single run is a plan of one step)."""
        ...


# kind -> the protocol what its factories build must fit. A kind not listed is unchecked.
CONTRACTS: dict[str, type] = {
    "backbones": Backbone,
    "tasks": Task,
    "launchers": Launcher,
}


def _protocol(kind: str) -> type | None:
    """The protocol of ``kind``; the evaluator one is imported only when an evaluator is
    built (so that the engine, which imports this module, loads no evaluation code)."""
    if kind == "evaluators":
        from virtex.evaluation.api import Evaluator

        return Evaluator
    return CONTRACTS.get(kind)

# what only some objects of a kind have: (when this attribute is there, the protocol)
OPTIONAL: dict[str, tuple[str, type]] = {
    "tasks": ("generate", CaptioningTask),
}

_BUILT: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def members(protocol: type) -> dict[str, str | None]:
    """What ``protocol`` (with the protocols it extends) declares: ``{name: annotation}`` of
    its attributes and ``{name: None}`` of its methods."""
    found: dict[str, str | None] = {}
    for cls in reversed(protocol.__mro__):
        if not getattr(cls, "_is_protocol", False) or cls is Protocol:
            continue
        for name, hint in vars(cls).get("__annotations__", {}).items():
            found[name] = hint if isinstance(hint, str) else getattr(hint, "__name__", "")
        for name, value in vars(cls).items():
            if callable(value) and (not name.startswith("_") or name == "__call__"):
                found.setdefault(name, None)
    return found


def _name(protocol: type) -> str:
    return f"{protocol.__module__}.{protocol.__qualname__}"


def problems(obj: Any, protocol: type) -> list[str]:
    """What ``obj`` lacks to fit ``protocol`` (empty if it fits)."""
    found = []
    for name, hint in members(protocol).items():
        if not hasattr(obj, name):
            found.append(f"it has no attribute '{name}'")
            continue
        value = getattr(obj, name)
        if hint is None and not callable(value):
            found.append(f"its '{name}' is not a method")
        elif hint == "int" and (isinstance(value, bool) or not isinstance(value, int)
                                or value < 1):
            found.append(f"its '{name}' is {value!r}, expected an int >= 1")
        elif hint == "Backbone" and (inner := problems(value, Backbone)):
            found.append(f"its '{name}' ({type(value).__name__}) is not a "
                         f"{_name(Backbone)}: {inner[0]}")
    return found


def check_built(obj: Any, kind: str, label: str) -> None:
    """Raise one :class:`UserError` if ``obj`` (built by ``label``, e.g. ``tasks.foo from
    plugin 'bar'``) does not fit its kind's protocol; remember ``label`` for later checks."""
    protocol = _protocol(kind)
    if protocol is None:
        return
    found = problems(obj, protocol)
    optional = OPTIONAL.get(kind)
    if not found and optional is not None and hasattr(obj, optional[0]):
        protocol = optional[1]
        found = problems(obj, protocol)
    if found:
        raise UserError(f"{label} built a {type(obj).__name__}, not a {_name(protocol)}: "
                        f"{'; '.join(found)}")
    try:
        _BUILT[obj] = label
    except TypeError:  # not weakly referenceable (or unhashable): nothing to remember
        pass


def label_of(obj: Any, default: str) -> str:
    """The component that built ``obj`` (``tasks.foo from plugin 'bar'``), or ``default``."""
    try:
        return _BUILT.get(obj, default)
    except TypeError:
        return default


def checked_build(factory: Callable, kind: str, label: str) -> Callable:
    """``factory`` (same signature) whose result is checked by :func:`check_built`; itself
    for a kind without a protocol."""
    if _protocol(kind) is None:
        return factory
    signature = inspect.signature(factory)

    @functools.wraps(factory, updated=())
    def build(*args: Any, **kwargs: Any) -> Any:
        obj = factory(*args, **kwargs)
        check_built(obj, kind, label)
        return obj

    del build.__wrapped__  # gin reads the signature below
    build.__signature__ = signature
    return build


def _one_element(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor) and value.numel() == 1


def check_task_output(out: Any, label: str) -> None:
    """Raise one :class:`UserError` if ``out`` is not the dict :class:`Task` documents."""
    import torch

    where = f"{label}: forward(batch) returned"
    if not isinstance(out, Mapping):
        raise UserError(f"{where} a {type(out).__name__}, expected a dict with 'loss' and "
                        "'losses' (see virtex.contracts.Task)")
    missing = [k for k in ("loss", "losses") if k not in out]
    if missing:
        raise UserError(f"{where} a dict without {' and '.join(map(repr, missing))} (it has "
                        f"{', '.join(map(repr, out)) or 'no keys'}; see virtex.contracts.Task)")
    loss = out["loss"]
    if not _one_element(loss) or not torch.is_floating_point(loss):
        raise UserError(f"{where} 'loss' = {_short(loss)}, expected a scalar float tensor")
    losses = out["losses"]
    if not isinstance(losses, Mapping):
        raise UserError(f"{where} 'losses' = {_short(losses)}, expected a dict of scalar tensors")
    for name, value in losses.items():
        if not isinstance(name, str) or not _one_element(value):
            raise UserError(f"{where} 'losses'[{name!r}] = {_short(value)}, expected a "
                            "scalar tensor under a string name")
    weight = out.get("weight")
    number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
    if weight is not None and not number and not _one_element(weight):
        raise UserError(f"{where} 'weight' = {_short(weight)}, expected how many terms 'loss' "
                        "averages over: a number or a one-element tensor")


def check_launch_result(result: Any, label: str) -> LaunchResult:
    """``result`` if it is a :class:`LaunchResult`, else one :class:`UserError`."""
    if not isinstance(result, LaunchResult):
        raise UserError(f"{label}: launch(plan) returned {_short(result)}, expected a "
                        f"{_name(LaunchResult)}")
    return result


def _short(value: Any) -> str:
    if hasattr(value, "shape"):
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
