"""The input kinds: one `InputKind` per value of `input.kind`, registered by the file that defines
its parameterization (ft.inputs.onehot, ...). Callers ask the kind what they need to know
(`needs_vocabulary_ids`, `swap_search`, `snaps_by_argmax`, `yields_tokens`, `max_length`) instead of
comparing kind strings, and `build_input` builds any registered kind. A new kind is one new file:
a parameterization (an `InputParam`) and an `InputKind` subclass passed to `register`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ft.core.errors import ConfigError
from ft.inputs.base import InputParam


@dataclass(frozen=True)
class InputArgs:
    """What a kind is built from: the arguments `build_input` takes (each kind reads the ones it needs).

    `allowed`: the vocabulary's token ids (the kinds with `needs_vocabulary_ids` get them)."""

    target_ids: Sequence[int]
    word_embeddings: torch.Tensor
    length: int = 1
    init_std: float = 0.01
    seed: int = 0
    save_raw: bool = False
    fast: bool | str = "auto"
    optimizer: Callable[..., torch.optim.Optimizer] | None = None
    tau_start: float = 2.0
    tau_end: float = 0.1
    anneal_steps: int | None = None
    allowed: torch.Tensor | None = None


class InputKind:
    """One value of `input.kind`: how its input is built, and the facts about it that the run needs.

    Subclasses set the class attributes and implement `build`; `make` checks the common arguments
    (the length, the vocabulary ids) first."""

    name: ClassVar[str] = ""  # the `input.kind` string (configs/input/<name>.yaml)
    summary: ClassVar[str] = ""  # one line for --help
    target: ClassVar[str] = "ft.inputs.build_input"  # the `_target_` of its shipped config
    needs_vocabulary_ids: ClassVar[bool] = False  # build needs `allowed`: the vocabulary's token ids
    swap_search: ClassVar[bool] = False  # the run is the token search (ft.engine.search), not gradient steps
    snaps_by_argmax: ClassVar[bool] = False  # its discrete readout is the argmax of its distribution
    yields_tokens: ClassVar[bool] = False  # its result is real tokens (token_ids, text), the objective theirs
    max_length: ClassVar[int | None] = None  # the largest `input.length` it takes (None: no limit)

    def build(self, args: InputArgs) -> InputParam:
        """The parameterization, initialized per target (the length and `allowed` already checked)."""
        raise NotImplementedError

    def make(self, args: InputArgs) -> InputParam:
        """`build` after the checks every kind shares."""
        length = args.length
        if not isinstance(length, int) or length < 1 or (self.max_length is not None and length > self.max_length):
            valid = "an integer >= 1" if self.max_length is None else f"1..{self.max_length} for input={self.name}"
            raise ConfigError(f"input.length={length!r}; valid: {valid}")
        if self.needs_vocabulary_ids and args.allowed is None:
            raise ConfigError(f"input={self.name} is built from the vocabulary's token ids (allowed=); none given")
        return self.build(args)

    def __repr__(self) -> str:
        return f"InputKind({self.name!r})"


_KINDS: dict[str, InputKind] = {}


def register(kind: InputKind | type[InputKind]) -> InputKind | type[InputKind]:
    """Add `kind` (an instance, or a class: then usable as a decorator) under `kind.name`. A name
    taken by another class is refused; the same class again (a reloaded module) replaces it."""
    instance = kind() if isinstance(kind, type) else kind
    name = instance.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"{type(instance).__name__}: an input kind needs a name")
    old = _KINDS.get(name)
    if old is not None and type(old).__qualname__ != type(instance).__qualname__:
        raise ValueError(f"input kind {name!r} is taken by {type(old).__qualname__}")
    _KINDS[name] = instance
    return kind


def unregister(name: str) -> None:
    """Remove a kind (tests that register their own)."""
    _KINDS.pop(name, None)


def input_kinds() -> list[str]:
    """The registered kinds' names, in the order they were registered."""
    return list(_KINDS)


def find_input_kind(name: object) -> InputKind | None:
    """The kind named `name`, None when there is none (a config without `input.kind`)."""
    return _KINDS.get(name) if isinstance(name, str) else None


def input_kind(name: object) -> InputKind:
    """The kind named `name`; ConfigError naming the value and the valid ones otherwise."""
    kind = find_input_kind(name)
    if kind is None:
        raise ConfigError(f"input.kind={name!r}; valid: {', '.join(_KINDS)}")
    return kind


def build_input(
    kind: str,
    target_ids: Sequence[int],
    word_embeddings: torch.Tensor,
    length: int = 1,
    init_std: float = 0.01,
    seed: int = 0,
    save_raw: bool = False,
    fast: bool | str = "auto",
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    tau_start: float = 2.0,
    tau_end: float = 0.1,
    anneal_steps: int | None = None,
    allowed: torch.Tensor | None = None,
) -> InputParam:
    """The parameterization named `kind` (any registered kind), initialized from the same x0 for
    every kind that starts from one.

    For `onehot`, fast="auto" takes the exact hidden-space path when the optimizer allows
    it (`is_linear_optimizer`), fast=true insists on it, fast=false keeps the literal path.
    `allowed`: the vocabulary's token ids, for the kinds that need them (`needs_vocabulary_ids`).
    """
    return input_kind(kind).make(InputArgs(
        target_ids=target_ids, word_embeddings=word_embeddings, length=length, init_std=init_std, seed=seed,
        save_raw=save_raw, fast=fast, optimizer=optimizer, tau_start=tau_start, tau_end=tau_end,
        anneal_steps=anneal_steps, allowed=allowed))
