"""Typed config keys: `Annotated[type, Rule(...)]`, the type and the range or shape a value must
have. The schemas (`ft.cli.schema`) and the unit and input kinds declare their keys with these."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal


@dataclass(frozen=True)
class Rule:
    """What a value must satisfy beyond its type. Bounds apply to numbers, `unique` to lists."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    unique: bool = False

    def problem(self, value: Any) -> bool:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value) and self.bounded:
                return True
            return ((self.ge is not None and not value >= self.ge) or (self.gt is not None and not value > self.gt)
                    or (self.le is not None and not value <= self.le) or (self.lt is not None and not value < self.lt))
        if isinstance(value, list) and self.unique:
            return len({repr(v) for v in value}) != len(value)
        return False

    @property
    def bounded(self) -> bool:
        return any(b is not None for b in (self.ge, self.gt, self.le, self.lt))

    def describe(self) -> str:
        parts = [f"{op} {_num(b)}" for op, b in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if b is not None]
        return (" " + " and ".join(parts) if parts else "") + (" without repeats" if self.unique else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**53 else repr(x)


def Int(**bounds: float) -> Any:  # noqa: N802 - reads like a type in the schemas
    return Annotated[int, Rule(**bounds)]


def Num(**bounds: float) -> Any:  # noqa: N802
    return Annotated[float, Rule(**bounds)]


def Choice(*values: object) -> Any:  # noqa: N802
    return Literal[values]  # type: ignore[valid-type]


Unique = Rule(unique=True)
