"""Progress bars that suit where they are shown: smooth on a terminal, one line every 30 s in a
redirected log (tqdm's default would write a line per update there)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def refresh_interval(stream: Any = None) -> float:
    """Seconds between updates of a bar written to `stream` (default stderr)."""
    stream = stream or sys.stderr
    return 0.1 if getattr(stream, "isatty", lambda: False)() else 30.0


def bar(iterable: Iterable[T], desc: str, **kwargs: Any) -> Iterable[T]:
    return tqdm(iterable, desc=desc, mininterval=refresh_interval(), **kwargs)
