"""What to textualize: single neurons, groups of neurons selected for target words, expressions
over sites (`terms`), and directions read from a file. Each target holds its objective as a
`Readout` (ft.targets.objectives); `kind` only says how it was made."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ft.core.errors import TargetError
from ft.data.directions import DirectionSet
from ft.model.sites import Site, point_width
from ft.model.vocab import Vocabulary
from ft.targets.objectives import Objective, Readout, as_readout
from ft.targets.registry import RebuildContext, unit_kind

log = logging.getLogger(__name__)


@dataclass
class Target:
    kind: str  # a registered unit kind (ft.targets.registry)
    readout: Readout  # the objective: weights over sites
    target_word: str | None = None
    k: int | None = None
    selection: str | None = None
    spec: str | None = None  # the expression as written (terms), `layer.L.point@ROW` (direction)
    direction: int | None = None  # row of the directions file
    direction_name: str | None = None
    latent: int | None = None  # an SAE latent's index
    sae_path: str | None = None  # the SAE directory it belongs to
    target_class: int | None = None  # a class logit's class id
    target_id: int = -1  # row in the full (unsharded) run, set by `number_targets`
    restart: int = 0  # which random restart of the target this row is
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.readout, Readout):  # a list of sites: their mean
            self.readout = as_readout(self.readout)

    @property
    def sites(self) -> list[Site]:
        """Every unit the objective weighs (a direction: every unit of its point)."""
        return self.readout.sites

    @property
    def reads(self) -> list[str]:
        """The contract's `sites`: units as written, and a direction's whole point `layer.L.point`."""
        return list(self.readout.reads)

    @property
    def init_id(self) -> int:
        """Seeds the initial input: the same target and restart start from the same point."""
        return self.target_id + 1_000_000 * self.restart

    @property
    def label(self) -> str:
        """What a reader knows this unit by (the `label` column, console, report and exports)."""
        return unit_label(self)

    @property
    def layer(self) -> int | None:
        """The layer of a neuron or a direction, and of terms that all read one layer."""
        layers = self.readout.layers
        return layers[0] if unit_kind(self.kind).one_layer and len(layers) == 1 else None


def refuse_empty(key: str, given: Sequence | None) -> None:
    """An empty list where None means "sample" or "all" is a mistake, never a request to sample."""
    if given is not None and len(given) == 0:
        raise TargetError(f"{key} is an empty list; valid: null (ft picks them) or a non-empty list")


def unit_label(t: Target) -> str:
    """`layer.5.ffn_out.17`, `layer.3.resid:sae.861`, `layer.5.head.2`, `logit.1 (pos)`, a group's
    word, a term's expression, a probe's concept and k: a name that tells two units apart (its
    kind's `UnitKind.label`)."""
    return unit_kind(t.kind).label(t)


def number_targets(targets: list[Target]) -> list[Target]:
    for i, t in enumerate(targets):
        t.target_id = i
    return targets


def with_restarts(targets: list[Target], restarts: int) -> list[Target]:
    """Each target `restarts` times in a row (restart 0 starts where a single run starts)."""
    if not isinstance(restarts, int) or restarts < 1:
        raise TargetError(f"engine.restarts={restarts!r}; valid: an integer >= 1")
    return [replace(t, restart=r) for t in targets for r in range(restarts)]


def check_word(word: str, vocab: Vocabulary, tokenizer: object) -> int:
    """Row of `word` in the vocabulary; TargetError if it is not one vocabulary item."""
    row = vocab.row_of().get(word)
    if row is None:
        pieces = tokenizer.tokenize(word)
        how = f"tokenizes to {pieces}" if len(pieces) > 1 else "is not in the vocabulary"
        raise TargetError(f"target word {word!r} {how}; target words must be single vocabulary items")
    return row


def direction_lookup(model: torch.nn.Module, directions: DirectionSet | None):
    """`parse`'s lookup of `layer.L.point@NAME` in a directions file."""
    if directions is None:
        return None
    return lambda layer, point, name: directions.vector(name, point_width(model, point), point)


def readouts_of_table(model: torch.nn.Module, table, directions: DirectionSet | None = None,
                      run_dir: str | Path | None = None) -> list[Objective]:
    """Each row's objective rebuilt from a targets table (`targets.parquet`) by its kind
    (`UnitKind.rebuild`): neurons and groups are the mean of their `sites`, expressions their
    `spec` (directions from the run's copy), SAE latents the run's kept SAE."""
    ctx = RebuildContext(model, direction_lookup(model, directions), None if run_dir is None else Path(run_dir))
    return [unit_kind(row.kind).rebuild(row, ctx) for row in table.itertuples()]

