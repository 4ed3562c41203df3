"""Single units `layer.L.point.unit` (the paper's neurons): the sites given, or a seeded sample of
units per layer. A head site `layer.L.head.H` in `target.sites` makes a head target (kinds/head)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Annotated

import torch

from ft.core.errors import ConfigError, TargetError
from ft.core.typed import Choice, Int, Num, Unique
from ft.model.sites import POINTS, Site, SiteError, num_layers, parse_head, point_width
from ft.targets.base import Target, refuse_empty
from ft.targets.objectives import head_norm, neuron
from ft.targets.registry import BuildContext, UnitKind, register


def site_target(model: torch.nn.Module, text: str) -> Target:
    """One entry of `target.sites`: a neuron `layer.L.point.unit` or a head `layer.L.head.H`."""
    try:
        head = parse_head(text, model)
    except SiteError as e:
        raise TargetError(str(e)) from None
    if head is not None:
        return Target("head", head_norm(model, *head), spec=str(text).strip())
    return Target("neuron", neuron(Site.parse(text).check(model)))


def neuron_targets(
    model: torch.nn.Module,
    sites: Sequence[str] | None = None,
    point: str = "ffn_out",
    fraction: float | None = None,
    per_layer: int | None = None,
    layers: Sequence[int] | None = None,
    seed: int = 0,
) -> list[Target]:
    """An explicit site list, or a seeded random sample of units per layer (`sites` None; an empty
    list is refused: it never means "sample")."""
    refuse_empty("target.sites", sites)
    refuse_empty("target.layers", layers)
    if sites is not None:
        return [site_target(model, s) for s in sites]
    n_layers = num_layers(model)
    layers = list(range(n_layers)) if layers is None else list(layers)
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise TargetError(f"layer {layer} out of range; valid 0..{n_layers - 1}")
    width = point_width(model, point)
    if per_layer is None:
        if fraction is None or not 0 < fraction <= 1:
            raise TargetError(f"target.fraction={fraction!r}; valid: 0 < fraction <= 1")
        per_layer = max(1, round(fraction * width))
    if not 0 < per_layer <= width:
        raise TargetError(f"target.per_layer={per_layer}; valid 1..{width}")
    rng = random.Random(seed)
    out = []
    for layer in layers:
        for unit in sorted(rng.sample(range(width), per_layer)):
            out.append(Target("neuron", neuron(Site(layer, point, unit))))
    if not out:
        raise TargetError("no targets: target.layers is empty")
    return out


@register
class NeuronKind(UnitKind):
    name = "neuron"
    option = "neurons"
    summary_line = "single units layer.L.point.unit: target.sites, or a seeded sample (fraction or per_layer)"
    keys = {"point": Choice(*POINTS), "sites": Annotated[list[str], Unique] | None,
            "fraction": Num(gt=0, le=1) | None, "per_layer": Int(ge=1) | None,
            "layers": Annotated[list[Int(ge=0)], Unique] | None}
    report_table = "neurons"
    static_readings = True
    own_unit = True

    def check(self, t: dict) -> None:
        seen: dict[object, str] = {}
        for text in t.get("sites") or []:
            try:
                head = parse_head(text)
                site = head if head is not None else Site.parse(text)
            except SiteError as e:
                raise ConfigError(f"target.sites: {e}") from None
            if site in seen:
                raise ConfigError(f"target.sites: {text!r} repeats {seen[site]!r}; valid: each site once")
            seen[site] = text

    def check_model(self, t: dict, model: torch.nn.Module) -> None:
        n = num_layers(model)
        for text in t.get("sites") or []:
            if parse_head(text, model) is None:
                Site.parse(text).check(model)
        bad = [x for x in t.get("layers") or [] if not 0 <= x < n]
        if bad:
            raise TargetError(f"target.layers: layer {bad[0]} out of range; valid 0..{n - 1}")
        if t.get("point") and not t.get("sites") and t.get("per_layer"):
            width = point_width(model, t["point"])
            if t["per_layer"] > width:
                raise TargetError(f"target.per_layer={t['per_layer']}; valid 1..{width}")

    def build(self, ctx: BuildContext) -> list[Target]:
        t = ctx.cfg.target
        return neuron_targets(ctx.encoder.model, sites=t.sites, point=t.point, fraction=t.fraction,
                              per_layer=t.per_layer, layers=t.layers, seed=t.seed)

    def label(self, t: Target) -> str:
        return str(t.reads[0]) if len(t.reads) == 1 else super().label(t)
