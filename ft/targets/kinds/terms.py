"""Expressions over sites (`target.specs`), e.g. `layer.3.ffn_out.5 - 0.5 * layer.2.ffn_act.7`, and
over directions of a file (`layer.L.point@NAME` with `target.file`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch

from ft.core.errors import ConfigError, TargetError
from ft.core.typed import Unique
from ft.data.directions import DirectionSet, load_directions
from ft.targets.base import Target, direction_lookup
from ft.targets.expressions import parse
from ft.targets.objectives import Objective
from ft.targets.registry import BuildContext, RebuildContext, UnitKind, register


def terms_targets(model: torch.nn.Module, specs: Sequence[str] | None, directions: DirectionSet | None = None
                  ) -> list[Target]:
    """One target per expression (`ft.targets.expressions.parse`), e.g. "layer.3.ffn_out.5 - layer.2.ffn_act.7"."""
    if not specs:
        raise TargetError("target.specs is empty; valid: a list of expressions, e.g. "
                          "'target.specs=[\"layer.3.ffn_out.5 - 0.5 * layer.2.ffn_act.7\"]'")
    lookup = direction_lookup(model, directions)
    return [Target("terms", parse(str(spec), model, lookup), spec=str(spec)) for spec in specs]


@register
class TermsKind(UnitKind):
    name = "terms"
    option = "terms"
    summary_line = "expressions over sites and directions: target.specs=['layer.3.ffn_out.5 - layer.2.ffn_act.7']"
    keys = {"specs": Annotated[list[str], Unique] | None, "file": str | None}
    one_layer = True

    def check(self, t: dict) -> None:
        if not t.get("specs"):
            raise ConfigError("target.specs is empty; valid: a list of expressions, e.g. "
                              "'target.specs=[\"layer.3.ffn_out.5 - 0.5 * layer.2.ffn_act.7\"]'")
        for spec in t["specs"]:  # the syntax; sites and directions are checked on the model
            parse(spec, None, (lambda *_: None) if t.get("file") else None)
        if t.get("file"):
            load_directions(t["file"])

    def build(self, ctx: BuildContext) -> list[Target]:
        return terms_targets(ctx.encoder.model, ctx.cfg.target.specs, ctx.directions)

    def rebuild(self, row: Any, ctx: RebuildContext) -> Objective:
        return parse(row.spec, ctx.model, ctx.directions)
