"""Arguments checked against type hints when components are built (virtex.checks)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import gin
import pytest

from virtex.checks import NonNegativeFloat, PositiveInt, Probability, checked
from virtex.errors import UserError


def build(size: PositiveInt = 1, lr: NonNegativeFloat = 0.1, p: Probability = 0.5,
          name: str | None = None, mode: Literal["a", "b"] = "a", flag: bool = False,
          fn: Callable | None = None, sizes: Sequence[int] = (1,), other=object()) -> dict:
    return {"size": size, "lr": lr, "p": p, "name": name, "mode": mode}


class Thing:
    def __init__(self, steps: PositiveInt = 1) -> None:
        self.steps = steps


@pytest.mark.parametrize("kwargs, message", [
    ({"size": "8"}, "x.size = '8': expected an int"),
    ({"size": 0}, "x.size = 0: expected an int >= 1"),
    ({"size": True}, "x.size = True: expected an int"),
    ({"size": 2.0}, "x.size = 2.0: expected an int"),
    ({"lr": -0.1}, "x.lr = -0.1: expected a number >= 0"),
    ({"lr": float("nan")}, "x.lr = nan: expected a number >= 0"),
    ({"p": 1.5}, "x.p = 1.5: expected a number >= 0 and <= 1"),
    ({"name": 3}, "x.name = 3: expected a string or None"),
    ({"mode": "c"}, "x.mode = 'c': expected one of 'a', 'b'"),
    ({"flag": "yes"}, "x.flag = 'yes': expected True or False"),
    ({"fn": 3}, "x.fn = 3: expected a callable (e.g. @kind.name) or None"),
    ({"sizes": [1, "2"]}, "x.sizes = [1, '2']: expected a list of ints"),
    ({"sizes": "12"}, "x.sizes = '12': expected a list"),
])
def test_a_wrong_argument_is_one_error_naming_it(kwargs, message):
    with pytest.raises(UserError) as info:
        checked(build, "x")(**kwargs)
    assert str(info.value) == message


def test_right_arguments_pass_and_unhinted_ones_are_not_checked():
    fn = checked(build, "x")
    assert fn(size=3, lr=0, p=1, name="n", mode="b", flag=True, fn=len, sizes=[2, 3],
              other="anything")["size"] == 3
    assert fn(lr=2)["lr"] == 2  # an int is a number


def test_a_class_keeps_its_identity_and_is_checked():
    cls = checked(Thing, "thing")
    assert cls is Thing and isinstance(cls(steps=2), Thing)
    with pytest.raises(UserError, match=r"^thing.steps = 0: expected an int >= 1$"):
        Thing(steps=0)


def test_gin_still_rejects_unknown_parameters():
    configurable = gin.external_configurable(checked(build, "checks_test.build"),
                                             name="build", module="checks_test")
    gin.parse_config("checks_test.build.size = 0")
    try:
        with pytest.raises(UserError, match=r"checks_test.build.size = 0: expected an int >= 1"):
            configurable()
        with pytest.raises(ValueError, match="doesn't have a parameter named 'nope'"):
            gin.parse_config("checks_test.build.nope = 1")
    finally:
        gin.clear_config()
