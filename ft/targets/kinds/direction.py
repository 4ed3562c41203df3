"""Directions read from a file: one target per row of `target.file` at each site `layer.L.point`
of `target.site`; the objective is the dot product h . v."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch

from ft.core.errors import ConfigError, TargetError
from ft.core.typed import Unique
from ft.data.directions import DirectionSet, load_directions
from ft.model.sites import SiteError, parse_point, point_width
from ft.targets.base import Target
from ft.targets.expressions import parse
from ft.targets.objectives import Objective, direction
from ft.targets.registry import BuildContext, RebuildContext, UnitKind, register


def direction_targets(model: torch.nn.Module, directions: DirectionSet, sites: str | Sequence[str]) -> list[Target]:
    """One target per row of the file, at each of `sites` (`layer.L.point`): objective h . v."""
    sites = [sites] if isinstance(sites, str) else list(sites or [])
    if not sites:
        raise TargetError("target.site is empty; valid: a site 'layer.<L>.<point>' or a list of them")
    out = []
    for text in sites:
        try:
            layer, point = parse_point(text, model)
        except SiteError as e:
            raise TargetError(f"target.site: {e}") from None
        width = point_width(model, point)
        for row in range(len(directions)):
            v = directions.vector(str(row), width, point)
            out.append(Target("direction", direction(layer, point, v), spec=f"layer.{layer}.{point}@{row}",
                              direction=row, direction_name=directions.name(row)))
    return out


def site_list(site: str | list) -> list:
    return [site] if isinstance(site, str) else list(site)


@register
class DirectionKind(UnitKind):
    name = "direction"
    option = "directions"
    summary_line = "rows of a directions file (target.file) at sites layer.L.point (target.site): h . v"
    keys = {"file": str | None, "site": str | Annotated[list[str], Unique] | None}

    def check(self, t: dict) -> None:
        if not t.get("file"):
            raise ConfigError("target.file=null; valid: a safetensors file with a 'directions' tensor [n, width]")
        if not t.get("site"):
            raise ConfigError("target.site=null; valid: a site 'layer.<L>.<point>' or a list of them")
        for site in site_list(t["site"]):
            parse_point(site)
        load_directions(t["file"])

    def check_model(self, t: dict, model: torch.nn.Module) -> None:
        if t.get("site"):
            points = [parse_point(text, model)[1] for text in site_list(t["site"])]
            if t.get("file"):
                directions = load_directions(t["file"])
                for point in points:
                    directions.vector("0", point_width(model, point), point)  # the file's width is the point's

    def build(self, ctx: BuildContext) -> list[Target]:
        if ctx.directions is None:
            raise ConfigError("target.file=null; valid: a safetensors file with a 'directions' tensor [n, width]")
        return direction_targets(ctx.encoder.model, ctx.directions, ctx.cfg.target.site)

    def rebuild(self, row: Any, ctx: RebuildContext) -> Objective:
        return parse(row.spec, ctx.model, ctx.directions)

    def label(self, t: Target) -> str:
        if t.direction_name is not None and t.spec is not None:
            return f"{t.spec.split('@')[0]}@{t.direction_name}"
        return super().label(t)
