"""Arguments checked against their type hints when a component is built.

Every factory the registry makes gin-configurable (and the kernel's own configurables:
``experiment``, ``trainer``, ``tokenizer``) goes through :func:`checked`: when it is called,
each argument is checked against its annotation, and a wrong one is one
:class:`~virtex.errors.UserError` naming the binding, the value and what was expected::

    trainer.batch_size = 0: expected an int >= 1

Annotations understood: ``int``, ``float`` (an int is accepted), ``str``, ``bool``, ``X | None``,
unions, ``Literal[...]`` (choices), ``Callable``, ``Sequence[X]`` / ``list[X]`` / ``tuple[X, ...]``,
and ``Annotated[T, Range(...)]`` for bounds (aliases below: :data:`PositiveInt`, ...).
Anything else is not checked. A value gin leaves unbound (``gin.REQUIRED``) is gin's to report.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import gin

from virtex.errors import UserError


@dataclass(frozen=True)
class Range:
    """Bounds for a number: ``low <= x`` (``low < x`` with ``open_low``) and ``x <= high``."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False

    def ok(self, x: float) -> bool:
        if isinstance(x, float) and math.isnan(x):
            return False
        if self.low is not None and (x <= self.low if self.open_low else x < self.low):
            return False
        return self.high is None or x <= self.high

    def text(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.open_low else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"<= {self.high:g}")
        return " and ".join(parts)


PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, open_low=True)]
NonNegativeFloat = Annotated[float, Range(0)]
Probability = Annotated[float, Range(0, 1)]

_NAMES = {int: "an int", float: "a number", str: "a string", bool: "True or False"}


def _problem(value: Any, hint: Any) -> str | None:
    """What ``value`` should have been for ``hint``, or None if it fits (or is unchecked)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        base, *meta = args
        problem = _problem(value, base)
        if problem is not None:
            return problem
        for m in meta:
            if isinstance(m, Range) and not m.ok(value):
                return f"{_NAMES.get(base, 'a number')} {m.text()}"
        return None
    if origin in (typing.Union, types.UnionType):
        problems = [_problem(value, a) for a in args]
        if any(p is None for p in problems):
            return None
        return " or ".join(p for p in problems if p)
    if hint is type(None):
        return None if value is None else "None"
    if origin is typing.Literal:
        return None if value in args else f"one of {', '.join(map(repr, args))}"
    if hint is bool:
        return None if isinstance(value, bool) else _NAMES[bool]
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else _NAMES[int]
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else _NAMES[float]
    if hint is str:
        return None if isinstance(value, str) else _NAMES[str]
    if hint is collections.abc.Callable or origin is collections.abc.Callable:
        return None if callable(value) else "a callable (e.g. @kind.name)"
    if origin in (list, tuple, collections.abc.Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            return "a list"
        item = args[0] if args and (origin is not tuple or len(args) == 2 and args[1] is ...) \
            else None
        if item is not None:
            for x in value:
                if (p := _problem(x, item)) is not None:
                    return f"a list of {p.removeprefix('an ').removeprefix('a ')}s"
        return None
    return None  # not a hint this module checks


def _hints(fn: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # an annotation that does not resolve: check nothing
        return {}


def check_arguments(name: str, signature: inspect.Signature, hints: dict[str, Any],
                    args: tuple, kwargs: dict) -> None:
    """Raise :class:`UserError` for the first argument that does not fit its hint."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return  # the call itself will say what is wrong
    for param, value in bound.arguments.items():
        hint = hints.get(param)
        if hint is None or value is gin.REQUIRED:
            continue
        problem = _problem(value, hint)
        if problem is not None:
            raise UserError(f"{name}.{param} = {value!r}: expected {problem}")


def checked(factory: Any, name: str) -> Any:
    """``factory`` with its arguments checked at each call (see module doc).

    A class keeps its identity (its ``__init__`` is checked); a function is wrapped with
    the same signature, so gin still rejects unknown parameter names.
    """
    if getattr(factory, "__virtex_checked__", None) == name:
        return factory
    if inspect.isclass(factory):
        init = factory.__init__
        signature, hints = inspect.signature(init), _hints(init)

        @functools.wraps(init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            check_arguments(name, signature, hints, (self, *args), kwargs)
            init(self, *args, **kwargs)

        del __init__.__wrapped__  # gin reads the signature below, not the original's
        __init__.__signature__ = signature
        factory.__init__ = __init__
        factory.__virtex_checked__ = name
        return factory
    signature, hints = inspect.signature(factory), _hints(factory)

    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check_arguments(name, signature, hints, args, kwargs)
        return factory(*args, **kwargs)

    del wrapper.__wrapped__  # gin reads the signature below, not the original's
    wrapper.__signature__ = signature
    wrapper.__virtex_checked__ = name
    return wrapper


def checked_as(name: str) -> Callable[[Any], Any]:
    """Decorator form of :func:`checked`: ``@gin.configurable("x")`` above ``@checked_as("x")``."""
    return lambda factory: checked(factory, name)
