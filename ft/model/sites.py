"""Neuron sites: `layer.{L}.{point}.{unit}` strings, and forward hooks that read them.

Points mean the same in every family (`ft.model.arch` maps them to each family's modules):
- ``attn_ctx``: the heads' context vectors, concatenated: the input of the attention's output
  projection (head h owns units h*d_head .. (h+1)*d_head - 1);
- ``attn_out``: the output of the attention's output projection, before the residual add;
- ``ffn_act``: the FFN's hidden activation, the input of its output projection;
- ``ffn_out``: the output of the FFN's output projection -- the paper's site, before the
  residual add and the layer's final LayerNorm;
- ``resid``: the hidden state the layer hands on (after its final LayerNorm).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ft.core.errors import SiteError
from ft.model.arch import adapter
from ft.model.arch.base import POINTS

_SITE_RE = re.compile(r"^layer\.(\d+)\.([a-z_]+)\.(\d+)$")


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    point: str
    unit: int

    @classmethod
    def parse(cls, text: str) -> Site:
        m = _SITE_RE.match(str(text).strip())
        if not m:
            raise SiteError(
                f"site {text!r} does not parse; expected 'layer.<L>.<point>.<unit>' "
                f"with point in {list(POINTS)}, e.g. 'layer.5.ffn_out.17'"
            )
        layer, point, unit = int(m.group(1)), m.group(2), int(m.group(3))
        if point not in POINTS:
            raise SiteError(f"site {text!r}: unknown point {point!r}; valid: {list(POINTS)}")
        return cls(layer, point, unit)

    def __str__(self) -> str:
        return f"layer.{self.layer}.{self.point}.{self.unit}"

    def check(self, model: nn.Module) -> Site:
        """Raise SiteError if the model has no such layer or unit."""
        n = num_layers(model)
        if not 0 <= self.layer < n:
            raise SiteError(f"site '{self}': layer {self.layer} out of range; valid 0..{n - 1}")
        w = point_width(model, self.point)
        if not 0 <= self.unit < w:
            raise SiteError(
                f"site '{self}': unit {self.unit} out of range for {self.point}; valid 0..{w - 1}"
            )
        return self


_POINT_RE = re.compile(r"^layer\.(\d+)\.([a-z_]+)$")
_HEAD_RE = re.compile(r"^layer\.(\d+)\.head\.(\d+)$")


def parse_head(text: str, model: nn.Module | None = None) -> tuple[int, int] | None:
    """(layer, head) of a head site `layer.{L}.head.{H}`, None for any other text; checked against
    `model` when given (SiteError naming the site and the valid range)."""
    m = _HEAD_RE.match(str(text).strip())
    if not m:
        return None
    layer, head = int(m.group(1)), int(m.group(2))
    if model is not None:
        n, heads = num_layers(model), adapter(model).num_heads
        if not 0 <= layer < n:
            raise SiteError(f"site {text!r}: layer {layer} out of range; valid 0..{n - 1}")
        if not 0 <= head < heads:
            raise SiteError(f"site {text!r}: head {head} out of range; valid 0..{heads - 1}")
    return layer, head


def head_sites(model: nn.Module, layer: int, head: int) -> list[Site]:
    """The `attn_ctx` units of one head: its context vector at the read position."""
    d = adapter(model).head_size
    return [Site(layer, "attn_ctx", u) for u in range(head * d, (head + 1) * d)]


def parse_point(text: str, model: nn.Module | None = None) -> tuple[int, str]:
    """(layer, point) of a whole-point site `layer.{L}.{point}` (what a direction reads); checked
    against `model` when given. SiteError naming the text and what is valid."""
    m = _POINT_RE.match(str(text).strip())
    if not m or m.group(2) not in POINTS:
        raise SiteError(f"site {text!r} does not parse; expected 'layer.<L>.<point>' with point in {list(POINTS)}, "
                        "e.g. 'layer.3.resid'")
    layer, point = int(m.group(1)), m.group(2)
    if model is not None and not 0 <= layer < num_layers(model):
        raise SiteError(f"site {text!r}: layer {layer} out of range; valid 0..{num_layers(model) - 1}")
    return layer, point


def num_layers(model: nn.Module) -> int:
    return adapter(model).num_layers


def point_width(model: nn.Module, point: str) -> int:
    if point not in POINTS:
        raise SiteError(f"unknown point {point!r}; valid: {list(POINTS)}")
    return adapter(model).point_width(point)


def point_hook(model: nn.Module, layer: int, point: str) -> tuple[nn.Module, str]:
    """(module, "pre" | "post") whose input or output is `point` in `layer`."""
    return adapter(model).point_hook(layer, point)


def register_point_hook(model: nn.Module, layer: int, point: str, fn) -> object:
    """`fn(activation)` on every forward of `point` in `layer`; returns the hook handle."""
    mod, hook = point_hook(model, layer, point)
    k, n = adapter(model).occurrence(layer)  # a shared layer (ALBERT) runs n times per forward
    calls = [0]

    def seen(t: torch.Tensor) -> None:
        i, calls[0] = calls[0], calls[0] + 1
        if i % n == k:
            fn(t)

    if hook == "pre":
        return mod.register_forward_pre_hook(lambda _m, args: seen(args[0]))
    return mod.register_forward_hook(lambda _m, _i, out: seen(out[0] if isinstance(out, tuple) else out))


class _StopForward(Exception):
    """Raised by the last hook: layers above the highest needed one are never run."""


class SiteReader:
    """Capture the activations of whole points at one position, for layers 0..max_layer.

    ``read(**forward_kwargs)`` returns ``{point: tensor [batch, max_layer + 1, width]}``
    and stops the forward pass right after the last needed module.
    """

    def __init__(self, model: nn.Module, points: Iterable[str], max_layer: int, position: int):
        self.model = model
        self.points = tuple(p for p in POINTS if p in set(points))
        if not self.points:
            raise SiteError(f"no points to read; valid: {list(POINTS)}")
        if not 0 <= max_layer < num_layers(model):
            raise SiteError(f"layer {max_layer} out of range; valid 0..{num_layers(model) - 1}")
        self.max_layer = max_layer
        self.position = position

    @staticmethod
    def step_flops(model: nn.Module, index: SiteIndex, length: int, position: int) -> float:
        """FLOPs of one forward + backward of `index`'s rows through this reader."""
        return hooked_step_flops(model, len(index.row_top), index.max_layer, length)

    def read(self, **forward_kwargs: torch.Tensor) -> dict[str, torch.Tensor]:
        store: dict[tuple[str, int], torch.Tensor] = {}
        handles = []
        last = (self.points[-1], self.max_layer)

        def hook_for(point: str, layer: int):
            def hook(t: torch.Tensor) -> None:
                store[(point, layer)] = t[:, self.position]
                if (point, layer) == last:
                    raise _StopForward

            return hook

        for layer in range(self.max_layer + 1):
            for point in self.points:
                handles.append(register_point_hook(self.model, layer, point, hook_for(point, layer)))
        try:
            self.model(**forward_kwargs)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return {
            p: torch.stack([store[(p, layer)] for layer in range(self.max_layer + 1)], dim=1)
            for p in self.points
        }


def hooked_step_flops(model: nn.Module, rows: int, max_layer: int, length: int) -> float:
    """FLOPs of one forward + backward of `rows` inputs through the hooked reader: every row runs
    the model's own layers up to `max_layer`, at every position."""
    a = adapter(model)
    H, inter, S = a.hidden_size, a.intermediate_size, length + 2
    linear = 2 * rows * (max_layer + 1) * S * (4 * H * H + 2 * H * inter)
    attention = 4 * rows * (max_layer + 1) * S * S * H
    return 2 * linear + 3 * attention


class SiteIndex:
    """Maps lists of sites to a flat index into the concatenated point activations."""

    def __init__(
        self, model: nn.Module, site_lists: Sequence[Sequence[Site]], max_layer: int | None = None,
        weights: Sequence[Sequence[float]] | None = None,
    ):
        """`weights[row][j]`: the weight of `site_lists[row][j]` (default 1/len: the mean)."""
        if not site_lists or any(len(s) == 0 for s in site_lists):
            raise SiteError("every target needs at least one site; got an empty site list")
        for sites in site_lists:
            for s in sites:
                s.check(model)
        self.points = tuple(p for p in POINTS if any(s.point == p for ss in site_lists for s in ss))
        needed = max(s.layer for ss in site_lists for s in ss)
        self.max_layer = needed if max_layer is None else max_layer
        n = self.max_layer + 1
        self.offsets: dict[str, int] = {}
        off = 0
        for p in self.points:
            self.offsets[p] = off
            off += n * point_width(model, p)
        self.width = {p: point_width(model, p) for p in self.points}
        k = max(len(s) for s in site_lists)
        idx = torch.zeros(len(site_lists), k, dtype=torch.long)
        weight = torch.zeros(len(site_lists), k)
        valid = torch.zeros(len(site_lists), k, dtype=torch.bool)
        for row, sites in enumerate(site_lists):
            for j, s in enumerate(sites):
                idx[row, j] = self.flat(s)
                weight[row, j] = 1.0 / len(sites) if weights is None else weights[row][j]
            valid[row, : len(sites)] = True
        self.index, self.weight, self.valid = idx, weight, valid  # [rows, k]; valid: not padding
        # highest layer each row needs: where a shared forward may let the row stop
        self.row_top = torch.tensor([max(s.layer for s in sites) for sites in site_lists], dtype=torch.long)

    def flat(self, s: Site) -> int:
        return self.offsets[s.point] + s.layer * self.width[s.point] + s.unit

    def flatten(self, acts: dict[str, torch.Tensor]) -> torch.Tensor:
        """[batch, total] in this index's layout."""
        return torch.cat([acts[p].flatten(1) for p in self.points], dim=1)
