"""The lean reader's plan (shared by the forward in `fastforward` and the hand-written backward in
`leangrad`): each layer's weights with Q, K and V fused (`Layer`), how rows with different top
layers flow through one shrinking batch (`Plan`), where each site is gathered (`SiteGather`), and
the broadcast attention for short inputs (`attend`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ft.model.arch import adapter
from ft.model.arch.base import LeanParts
from ft.model.sites import SiteIndex


class Layer:
    """The weights of one layer, with Q, K and V concatenated once."""

    def __init__(self, parts: LeanParts):
        self.heads = parts.heads
        self.wqkv = torch.cat([parts.query.weight, parts.key.weight, parts.value.weight]).detach()
        self.bqkv = torch.cat([parts.query.bias, parts.key.bias, parts.value.bias]).detach()
        self.attn_out, self.ln1 = parts.attn_out, parts.ln1
        self.inter, self.act = parts.inter, parts.act
        self.out, self.ln2 = parts.out, parts.ln2


def lean_layers(model: nn.Module) -> list[Layer]:
    a = adapter(model)
    key = tuple(p.data_ptr() for p in a.lean_parts(0).query.parameters())
    cache = getattr(model, "_ft_fast_layers", None)
    if cache is None or cache[0] != key:  # built once per model (and again after a device move)
        cache = (key, [Layer(a.lean_parts(i)) for i in range(a.num_layers)])
        model._ft_fast_layers = cache
    return cache[1]


def project_qkv(h: torch.Tensor, L: Layer, const_ends: bool) -> torch.Tensor:
    """The fused Q, K, V projections [n, S, 3H] of hidden states h [n, S, H]. `const_ends`: [CLS] and
    [SEP] are the same in every row and need no gradient, so they are projected once (row 0's)."""
    n, S, H = h.shape
    if not const_ends or S <= 2:
        return F.linear(h, L.wqkv, L.bqkv)
    # a 2-D matmul: a strided 3-D slice would make F.linear fall back to a batched matmul with the
    # weight repeated per row (~30x slower)
    ends = F.linear(h[:1, [0, S - 1]].detach(), L.wqkv, L.bqkv)
    mid = F.linear(h[:, 1:-1].reshape(-1, H), L.wqkv, L.bqkv).view(n, S - 2, -1)
    return torch.cat([ends[:, :1].expand(n, 1, -1), mid, ends[:, 1:].expand(n, 1, -1)], 1)


def attend(qkv: torch.Tensor, heads: int, sdpa: bool, query: int | None = None) -> torch.Tensor:
    """Self-attention from fused [n, S, 3H] projections: [n * S, H] for every query position,
    or [n, H] for the one position `query`. For short sequences plain broadcasting beats the
    fused kernel's per-(row, head) setup."""
    n, S, H3 = qkv.shape
    H = H3 // 3
    d = H // heads
    t = qkv.view(n, S, 3, heads, d)
    if sdpa:
        q, k, v = t.permute(2, 0, 3, 1, 4).unbind(0)  # [n, heads, S, d] each
        if query is not None:
            q = q[:, :, query : query + 1]
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, H)
    q, k, v = t.unbind(2)  # [n, S, heads, d] each
    if query is not None:
        q = q[:, query : query + 1]
    scores = (q.unsqueeze(2) * k.unsqueeze(1)).sum(-1) * d**-0.5  # [n, S_q, S_k, heads]
    weights = scores.softmax(dim=2)
    return (weights.unsqueeze(-1) * v.unsqueeze(1)).sum(2).reshape(-1, H)


# up to this many positions the broadcast attention is faster than the fused kernel
SHORT_SEQUENCE = 8


class Plan:
    """How a batch of rows with these top layers flows through the layers (built once).

    Rows are sorted by top layer, highest first. At layer j the first n_j rows are present;
    the first g_j = n_{j+1} go on (they need every position), the other rows end there and
    need only the read position (as a query; every position still gives keys and values).
    The tokens kept after attention are all positions of the go rows, then the read position
    of the ending rows; `at_p[j]` is each present row's read position in that token list.
    """

    def __init__(self, row_top: torch.Tensor, max_layer: int, S: int, p: int, device: torch.device):
        top = row_top.cpu()
        self.n, self.S = len(top), S
        order = torch.argsort(top, descending=True, stable=True)
        self.sorted = bool((order == torch.arange(self.n)).all())
        self.order = order.to(device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(self.n)
        self.inverse = inverse.to(device)
        counts = torch.bincount(top, minlength=max_layer + 1)[: max_layer + 1]
        self.alive = counts.flip(0).cumsum(0).flip(0).tolist() + [0]
        self.at_p: list[torch.Tensor] = []
        for j in range(max_layer + 1):
            n_all, n_go = self.alive[j], self.alive[j + 1]
            self.at_p.append(torch.cat([torch.arange(n_go) * S + p,
                                        torch.arange(n_go * S, n_go * S + n_all - n_go)]).to(device))


class SiteGather:
    """Where each site of a `SiteIndex` is found in the lean pass, and what the rows that end
    at each layer need there.

    `reads[layer]` = [(source, flat offsets into that source's [tokens, width] activations)];
    `slots` = the [rows, k] slots those values fill, in the same order. In a row's top layer
    the FFN output is only computed for the units it reads (`end_units[layer]`: the index
    among the ending rows' tokens and the unit of each, read from the source "ffn_out_end"),
    unless some row ending there reads the residual stream or many units of the FFN output
    (then `end_units[layer]` is None: the whole layer is computed).
    """

    def __init__(self, index: SiteIndex, plan: Plan, device: torch.device, max_units_per_row: int = 8):
        n, k = index.index.shape
        real = index.valid
        rows = torch.arange(n).unsqueeze(1).expand(n, k)[real]
        slots = rows * k + torch.arange(k).expand(n, k)[real]
        flat = index.index[real]
        pos = plan.inverse.cpu()[rows]  # each site's row's place in the sorted batch
        point, layer, unit = torch.zeros_like(flat), torch.zeros_like(flat), torch.zeros_like(flat)
        for i, pt in enumerate(index.points):
            off, width = index.offsets[pt], index.width[pt]
            inside = (flat >= off) & (flat < off + (index.max_layer + 1) * width)
            point[inside] = i
            layer[inside], unit[inside] = (flat[inside] - off) // width, (flat[inside] - off) % width
        ends = pos >= torch.tensor(plan.alive[1:])[layer]  # the site's row ends at the site's layer
        code = {pt: i for i, pt in enumerate(index.points)}
        self.end_units: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.reads: list[list[tuple[str, torch.Tensor]]] = []
        fills: list[torch.Tensor] = []
        for j in range(len(plan.alive) - 1):
            reads: list[tuple[str, torch.Tensor]] = []
            tok = plan.at_p[j].cpu()
            n_end = plan.alive[j] - plan.alive[j + 1]
            ending = ends & (layer == j)
            end_out = ending & (point == code.get("ffn_out", -1))
            trim = (n_end > 0 and not (ending & (point == code.get("resid", -1))).any()
                    and int(end_out.sum()) <= max_units_per_row * n_end)
            if trim:
                go = plan.alive[j + 1] * plan.S
                self.end_units.append(((tok[pos[end_out]] - go).to(device), unit[end_out].to(device)))
            else:
                self.end_units.append(None)
                end_out = torch.zeros_like(end_out)
            for pt, i in code.items():
                take = (layer == j) & (point == i) & ~end_out
                if take.any():
                    reads.append((pt, (tok[pos[take]] * index.width[pt] + unit[take]).to(device)))
                    fills.append(slots[take])
            if end_out.any():
                reads.append(("ffn_out_end", torch.arange(int(end_out.sum()), device=device)))
                fills.append(slots[end_out])
            self.reads.append(reads)
        self.slots = torch.cat(fills).to(device)
        self.size = n * k
        self.shape = (n, k)


def site_plan(index: SiteIndex, length: int, position: int, device: torch.device) -> tuple[Plan, SiteGather]:
    """The pass plan and site gather of `index` for inputs of `length` (built once per index)."""
    cache = index.__dict__.setdefault("_fast_plans", {})
    key = (length, position, torch.device(device))
    if key not in cache:
        plan = Plan(index.row_top, index.max_layer, length, position, device)
        cache[key] = (plan, SiteGather(index, plan, device))
    return cache[key]
