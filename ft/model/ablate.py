"""Ablation: units of the forward pass held at zero or at a fixed value (their mean).

`with ablated(model, sites, mode="zero"): ...` edits every forward of `model` inside the block,
whichever reader runs it:
- the model's own modules (the hooked reader `ft.model.sites.SiteReader`, a task head built on the
  model, any `model(...)` call): forward hooks on each point's module overwrite the units at every
  position, so every later layer sees the ablated value;
- the lean forward (`ft.model.fastforward.FastSiteReader`), which computes the layers itself: it reads
  the same edits from `model._ft_ablation` and applies them where it computes each point.
A site read inside the block reads the ablated value (zero, or its mean). Blocks nest: the inner
one adds its sites to the outer one's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ft.core.errors import ConfigError
from ft.model.arch import adapter
from ft.model.sites import Site, point_width

MODES = ("zero", "mean")


@dataclass(frozen=True)
class Ablation:
    """(layer, point) -> (mask [width] bool: ablated units, fill [width]: their values)."""

    edits: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    def apply(self, layer: int, point: str, t: torch.Tensor) -> torch.Tensor:
        """`t` [..., width] with the ablated units of (layer, point) replaced (not in place)."""
        edit = self.edits.get((layer, point))
        if edit is None:
            return t
        mask, fill = edit
        return torch.where(mask.to(t.device), fill.to(t.device, t.dtype), t)

    def apply_units(self, layer: int, point: str, values: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """`values` [m]: the activations of (layer, point) at `units` [m], ablated ones replaced."""
        edit = self.edits.get((layer, point))
        if edit is None:
            return values
        mask, fill = (x.to(values.device) for x in edit)
        return torch.where(mask[units], fill[units].to(values.dtype), values)

    def merged(self, other: Ablation | None) -> Ablation:
        """This ablation on top of `other` (an enclosing block)."""
        if other is None:
            return self
        edits = dict(other.edits)
        for key, (mask, fill) in self.edits.items():
            if key in edits:
                m0, f0 = edits[key]
                mask, fill = mask | m0, torch.where(mask, fill, f0)
            edits[key] = (mask, fill)
        return Ablation(edits)


def build_ablation(model: nn.Module, sites: Sequence[Site], mode: str = "zero",
                   values: Sequence[float] | None = None) -> Ablation:
    """The edits that hold `sites` at 0 (`zero`) or at `values` (`mean`: one value per site, e.g.
    its mean activation over a corpus). ConfigError naming the bad mode, site or value count."""
    if mode not in MODES:
        raise ConfigError(f"ablate.mode={mode!r}; valid: {list(MODES)}")
    if not sites:
        raise ConfigError("ablate.sites is empty; valid: a list of sites 'layer.<L>.<point>.<unit>'")
    if mode == "mean" and (values is None or len(values) != len(sites)):
        raise ConfigError(f"ablate.mode=mean needs one value per site; got {0 if values is None else len(values)} "
                          f"for {len(sites)} sites")
    device = next(model.parameters()).device
    edits: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for i, site in enumerate(sites):
        site.check(model)
        key = (site.layer, site.point)
        if key not in edits:
            w = point_width(model, site.point)
            edits[key] = (torch.zeros(w, dtype=torch.bool, device=device), torch.zeros(w, device=device))
        mask, fill = edits[key]
        mask[site.unit] = True
        fill[site.unit] = 0.0 if mode == "zero" else float(values[i])  # type: ignore[index]
    return Ablation(edits)


def _edit_hook(model: nn.Module, layer: int, point: str, ablation: Ablation) -> object:
    """A hook on `point`'s module that returns its input (pre) or output (post) ablated."""
    mod, hook = adapter(model).point_hook(layer, point)
    k, n = adapter(model).occurrence(layer)  # a shared layer (ALBERT): only its `layer`-th run
    calls = [0]

    def mine() -> bool:
        i, calls[0] = calls[0], calls[0] + 1
        return i % n == k

    if hook == "pre":
        def pre(_m, args):
            if not mine():
                return None
            return (ablation.apply(layer, point, args[0]), *args[1:])

        return mod.register_forward_pre_hook(pre)

    def post(_m, _i, out):
        if not mine():
            return None
        if isinstance(out, tuple):
            return (ablation.apply(layer, point, out[0]), *out[1:])
        return ablation.apply(layer, point, out)

    return mod.register_forward_hook(post)


@contextmanager
def ablated(model: nn.Module, sites: Sequence[Site | str], mode: str = "zero",
            values: Sequence[float] | None = None) -> Iterator[Ablation]:
    """Within the block, every forward of `model` (hooked or lean) has `sites` ablated."""
    sites = [s if isinstance(s, Site) else Site.parse(s) for s in sites]
    ablation = build_ablation(model, sites, mode, values)
    outer = getattr(model, "_ft_ablation", None)
    # hooks for this block's edits only: an enclosing block's hooks still run (registered earlier)
    handles = [_edit_hook(model, layer, point, ablation) for layer, point in ablation.edits]
    model._ft_ablation = ablation.merged(outer)
    try:
        yield model._ft_ablation
    finally:
        for h in handles:
            h.remove()
        model._ft_ablation = outer


def active(model: nn.Module) -> Ablation | None:
    """The ablation in force on `model` (None outside every block)."""
    return getattr(model, "_ft_ablation", None)
