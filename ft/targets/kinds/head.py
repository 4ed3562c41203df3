"""Attention heads `layer.L.head.H`: the L2 norm of the head's context vector at the read position.
Written among `target.sites` of a neuron run (`target=neurons target.sites=[layer.3.head.1]`)."""

from __future__ import annotations

from typing import Any

from ft.targets.expressions import parse
from ft.targets.objectives import Objective
from ft.targets.registry import RebuildContext, UnitKind, register


@register
class HeadKind(UnitKind):
    name = "head"
    option = None  # written as `layer.L.head.H` in target.sites (target=neurons)
    own_unit = True
    summary_line = "attention heads layer.L.head.H (in target.sites of target=neurons): the context vector's norm"

    def rebuild(self, row: Any, ctx: RebuildContext) -> Objective:
        return parse(row.spec, ctx.model, ctx.directions)
