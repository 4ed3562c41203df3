"""The unit-kind registry: one `UnitKind` per `target.kind`, each defined in its own file under
`ft/targets/kinds/` and registered there (`ft/targets/__init__` imports them all, so importing
anything of `ft.targets` registers every shipped kind). The schema, the run, the metrics, the results, the
exports and the report reach a kind only through `unit_kind(name)`; a new kind is one file plus
its `configs/target/*.yaml`, with no branch added anywhere else (docs: "Adding a unit kind")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ft.core.errors import ConfigError

if TYPE_CHECKING:  # types only: the registry imports nothing above it at run time
    import pandas as pd
    import torch

    from ft.data.directions import DirectionSet
    from ft.model.encoder import Encoder
    from ft.model.vocab import Vocabulary
    from ft.targets.objectives import Objective


Target = Any  # an ft.targets.base.Target (not imported: base reaches the kinds through this registry)


@dataclass
class BuildContext:
    """What `UnitKind.build` may use: the whole config (`cfg.target` is the kind's node), the
    encoder, the vocabulary, the selection sweep of `selection_point` (a [V', layers, width]
    table or its streamed `SweepSummary`; None when the kind asked for none), a directions file
    and, on a resume of a demo-SAE run, that SAE's kept copy."""

    cfg: Any
    encoder: Encoder
    vocab: Vocabulary | None = None
    sweep: Any = None
    directions: DirectionSet | None = None
    resumed: dict | None = None


@dataclass
class RebuildContext:
    """What `UnitKind.rebuild` may use to remake a targets-table row's objective: the model, the
    lookup of `layer.L.point@NAME` in the run's directions, the run directory (its kept inputs)
    and a cache shared by the rows of one table (an SAE is read once)."""

    model: torch.nn.Module
    directions: Callable | None = None
    run_dir: Path | None = None
    cache: dict = field(default_factory=dict)


@dataclass
class SummaryContext:
    """What `UnitKind.summary` may use after the fit: the config, the kept rows, the targets,
    the encoder and the run directory."""

    cfg: Any
    table: pd.DataFrame
    targets: list[Target]
    encoder: Encoder
    run_dir: Path


class UnitKind:
    """One kind of unit. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]  # `target.kind`, and the targets table's `kind` column
    option: ClassVar[str | None] = None  # its configs/target/<option>.yaml (None: built by another kind)
    summary_line: ClassVar[str] = ""  # one line for `--help`
    aliases: ClassVar[tuple[str, ...]] = ()  # older spellings users typed or runs stored
    keys: ClassVar[dict[str, Any]] = {}  # its `target.*` keys with their types (ft.core.typed)
    nodes: ClassVar[dict[str, type]] = {}  # sub-nodes (`target.demo`) and their schema dataclasses
    word_stats: ClassVar[str] = "sites"  # how every word is measured: "sites" (the sweep) or "classifier"
    token_examples: ClassVar[bool] = True  # corpus examples score its objective token by token
    one_layer: ClassVar[bool] = True  # a target that reads one layer has a `layer`
    report_table: ClassVar[str | None] = None  # the report's section for its targets: "neurons", "groups"
    own_unit: ClassVar[bool] = False  # one unit of the model itself (exports name it by its site)
    static_readings: ClassVar[bool] = False  # single units get their static weight readings as columns
    made_inputs: ClassVar[tuple[str, ...]] = ()  # roles of inputs it makes for a run and keeps (the demo SAE)

    def check(self, t: dict) -> None:
        """Config-only checks of `target` (a plain dict): ConfigError or TargetError naming the key."""

    def check_model(self, t: dict, model: torch.nn.Module) -> None:
        """Checks that need the model's shapes (before any job runs): TargetError."""

    def selection_point(self, t: Any) -> str | None:
        """The point whose vocabulary sweep selects this kind's targets (groups), else None."""
        return None

    def selection_rows(self, t: Any, vocab: Vocabulary, tokenizer: object) -> list[int]:
        """The vocabulary rows a streamed selection keeps of the sweep (the target words)."""
        return []

    def made(self, targets: list[Target]) -> dict[str, Path]:
        """Inputs the kind made for this run (role -> path), kept like the files it reads."""
        return {}

    def sources(self, t: Any) -> dict[str, Path]:
        """Files the kind reads (role -> path), kept in the run directory (`ft.rundir.kept`)."""
        return {}

    def build(self, ctx: BuildContext) -> list[Target]:
        raise NotImplementedError

    def rebuild(self, row: Any, ctx: RebuildContext) -> Objective:
        """A targets-table row's objective: by default the mean of its `sites`."""
        from ft.model.sites import Site
        from ft.targets.objectives import mean

        return mean([Site.parse(s).check(ctx.model) for s in row.sites])

    def label(self, t: Target) -> str:
        """What a reader knows the unit by: its expression, else its sites."""
        if t.spec is not None:
            return str(t.spec)
        reads = t.reads
        return str(reads[0]) + (f" +{len(reads) - 1}" if len(reads) > 1 else "")

    def row_label(self, row: Any) -> str | None:
        """The label of a stored row written before runs stored one (None: the caller's default)."""
        return None

    def summary(self, ctx: SummaryContext) -> dict[str, float]:
        """Extra summary keys for a run of this kind."""
        return {}


_KINDS: dict[str, UnitKind] = {}
_ALIASES: dict[str, str] = {}


def register(cls: type[UnitKind]) -> type[UnitKind]:
    """Class decorator: `cls` answers for `cls.name` and its aliases (a name taken twice is a bug)."""
    for n in (cls.name, *cls.aliases):
        if n in _KINDS or n in _ALIASES:
            raise ValueError(f"unit kind {n!r} is registered twice")
    _KINDS[cls.name] = cls()
    _ALIASES.update({a: cls.name for a in cls.aliases})
    return cls


def unregister(name: str) -> None:
    """Forget the kind `name` and its aliases (tests that register a kind of their own)."""
    kind = _KINDS.pop(name, None)
    for alias in getattr(kind, "aliases", ()):
        _ALIASES.pop(alias, None)


def canonical(name: str) -> str:
    """The one spelling of a kind (`clusters` -> `cluster`); unknown names are returned as they are."""
    return _ALIASES.get(name, name)


def unit_kind(name: str) -> UnitKind:
    """The registered kind `name` (or an alias of it); ConfigError naming the valid kinds."""
    kind = _KINDS.get(canonical(str(name)))
    if kind is None:
        raise ConfigError(f"target.kind={name!r}; valid: {', '.join(unit_kinds())}")
    return kind


def unit_kinds(configurable: bool = False) -> list[str]:
    """Every registered kind's name (`configurable`: only those a `target=` option selects)."""
    return [n for n, k in _KINDS.items() if not configurable or k.option is not None]


def all_spellings() -> list[str]:
    """Names and aliases: what `target.kind` accepts."""
    return [*_KINDS, *_ALIASES]
