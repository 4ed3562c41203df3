"""A lean forward pass of a BERT encoder that reads sites at one position.

Same arithmetic as Hugging Face's `BertLayer` (eval mode, no padding mask), organised for
activation maximization on short inputs:
- the query, key and value projections run as one fused matmul;
- each row stops at its own highest needed layer, and in that layer only the read
  position is a query and goes on to the attention output and FFN (the other positions only
  give keys and values): about 55% less work in a row's top layer;
- short inputs attend by broadcasting (no per-(row, head) kernel set-up), and the sites
  are gathered straight from each layer's activations (`read_sites`);
- rows that stop at different layers share one pass whose batch shrinks as it climbs,
  so every matmul is as large as the batch allows.

`FastSiteReader` has the interface of `ft.model.sites.SiteReader`; `supports(model)` says whether
a model has the standard BERT layer structure this relies on (otherwise use the hooks).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ft.core.errors import FtError
from ft.model.ablate import active
from ft.model.arch import adapter
from ft.model.arch.base import LeanParts
from ft.model.sites import POINTS, SiteIndex, num_layers


def supports(model: nn.Module) -> bool:
    """True for encoders whose family has BERT's layer layout (`ft.model.arch`, `Adapter.lean`), which
    this module reproduces exactly: absolute positions, no cross-attention."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_decoder", False):
        return False
    if getattr(cfg, "position_embedding_type", "absolute") not in ("absolute", None):
        return False
    try:
        a = adapter(model)
        block = a.layers()[0] if a.lean else None
        a.lean_parts(0) if a.lean else None
    except (FtError, AttributeError, IndexError):  # a family without an adapter, or not its layout
        return False
    return block is not None and not getattr(block, "add_cross_attention", False)


class _Layer:
    """The weights of one layer, with Q, K and V concatenated once."""

    def __init__(self, parts: LeanParts):
        self.heads = parts.heads
        self.wqkv = torch.cat([parts.query.weight, parts.key.weight, parts.value.weight]).detach()
        self.bqkv = torch.cat([parts.query.bias, parts.key.bias, parts.value.bias]).detach()
        self.attn_out, self.ln1 = parts.attn_out, parts.ln1
        self.inter, self.act = parts.inter, parts.act
        self.out, self.ln2 = parts.out, parts.ln2


def _layers(model: nn.Module) -> list[_Layer]:
    a = adapter(model)
    key = tuple(p.data_ptr() for p in a.lean_parts(0).query.parameters())
    cache = getattr(model, "_ft_fast_layers", None)
    if cache is None or cache[0] != key:  # built once per model (and again after a device move)
        cache = (key, [_Layer(a.lean_parts(i)) for i in range(a.num_layers)])
        model._ft_fast_layers = cache
    return cache[1]


def project_qkv(h: torch.Tensor, L: _Layer, const_ends: bool) -> torch.Tensor:
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


def _attend(qkv: torch.Tensor, heads: int, sdpa: bool, query: int | None = None) -> torch.Tensor:
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


# read_sites with grad: one autograd node with a hand-written backward (ft.model.leangrad) where it applies
HAND_BACKWARD = True


def hand_backward(layers: list[_Layer], dtype: torch.dtype, S: int) -> bool:
    """Whether `read_sites` with gradients (and no ablation) runs ft.model.leangrad's backward on these
    layers, for inputs of S positions in `dtype` (what `step_flops` counts too)."""
    from ft.model.leangrad import usable

    return HAND_BACKWARD and usable(layers, dtype, S)

# up to this many positions the broadcast attention is faster than the fused kernel
SHORT_SEQUENCE = 8


class _Plan:
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


class _SiteGather:
    """Where each site of a `SiteIndex` is found in the lean pass, and what the rows that end
    at each layer need there.

    `reads[layer]` = [(source, flat offsets into that source's [tokens, width] activations)];
    `slots` = the [rows, k] slots those values fill, in the same order. In a row's top layer
    the FFN output is only computed for the units it reads (`end_units[layer]`: the index
    among the ending rows' tokens and the unit of each, read from the source "ffn_out_end"),
    unless some row ending there reads the residual stream or many units of the FFN output
    (then `end_units[layer]` is None: the whole layer is computed).
    """

    def __init__(self, index: SiteIndex, plan: _Plan, device: torch.device, max_units_per_row: int = 8):
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


def site_plan(index: SiteIndex, length: int, position: int, device: torch.device) -> tuple[_Plan, _SiteGather]:
    """The pass plan and site gather of `index` for inputs of `length` (built once per index)."""
    cache = index.__dict__.setdefault("_fast_plans", {})
    key = (length, position, torch.device(device))
    if key not in cache:
        plan = _Plan(index.row_top, index.max_layer, length, position, device)
        cache[key] = (plan, _SiteGather(index, plan, device))
    return cache[key]


class FastSiteReader:
    """Activations of whole points at one position for layers 0..max_layer (see module doc).

    Rows may stop at different layers (`row_top`): they share every layer's matmuls up to
    their own top, so a mixed batch of targets runs as one pass whose batch shrinks as it
    climbs. `read` returns whole points (zeros above a row's top layer); `read_sites` only
    the sites of a `SiteIndex`, which is what optimization needs.
    """

    def __init__(self, model: nn.Module, points: Iterable[str], max_layer: int, position: int):
        self.model = model
        self.points = tuple(p for p in POINTS if p in set(points))
        self.max_layer = max_layer
        self.position = position
        if not 0 <= max_layer < num_layers(model):
            raise ValueError(f"layer {max_layer} out of range; valid 0..{num_layers(model) - 1}")

    def _pass(self, given: torch.Tensor, plan: _Plan, ids: bool, const_ends: bool,
              end_units: list | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Run the layers; yield (layer, {source: activations}) for each layer: whole points
        over the kept tokens, except where `end_units[layer]` = (ending token, unit) pairs: there
        the FFN output and residual cover only the rows going on, and "ffn_out_end" holds the
        FFN output of the ending rows at just those units. Splits rather than gathers or slices
        divide the rows: their gradients are concatenated, never zero-filled and scattered."""
        if not plan.sorted:
            given = given[plan.order]
        a = adapter(self.model)
        ab = active(self.model)  # an `ft.model.ablate.ablated` block: its units are edited where computed
        h = a.to_hidden(a.embed(input_ids=given) if ids else a.embed(inputs_embeds=given))
        S, H = h.shape[1], h.shape[2]
        for layer, L in enumerate(_layers(self.model)[: self.max_layer + 1]):
            n_all, n_go = plan.alive[layer], plan.alive[layer + 1]  # rows here; rows going on
            qkv = project_qkv(h, L, layer == 0 and const_ends)
            sdpa, n_end, go = S > SHORT_SEQUENCE, n_all - n_go, n_go * S
            if not n_end:
                ctx, resid = _attend(qkv, L.heads, sdpa), h.reshape(-1, H)
            else:  # rows ending here: only their read position goes on, as the only query
                qkv_go, qkv_end = qkv.split([n_go, n_end])
                h_go, h_end = h.split([n_go, n_end])
                ctx_end, resid_end = _attend(qkv_end, L.heads, sdpa, query=self.position), h_end[:, self.position]
                ctx = torch.cat([_attend(qkv_go, L.heads, sdpa), ctx_end]) if n_go else ctx_end
                resid = torch.cat([h_go.reshape(-1, H), resid_end]) if n_go else resid_end
            if ab is not None:
                ctx = ab.apply(layer, "attn_ctx", ctx)
            attn = L.attn_out(ctx)
            if ab is not None:
                attn = ab.apply(layer, "attn_out", attn)
            a = L.ln1(attn + resid)
            act = L.act(L.inter(a))
            if ab is not None:
                act = ab.apply(layer, "ffn_act", act)
            pairs = None if end_units is None or not n_end else end_units[layer]
            if pairs is None:
                out = L.out(act)
                if ab is not None:
                    out = ab.apply(layer, "ffn_out", out)
                h_tok = L.ln2(out + a)
                if ab is not None:
                    h_tok = ab.apply(layer, "resid", h_tok)
                yield layer, {"attn_ctx": ctx, "attn_out": attn, "ffn_act": act, "ffn_out": out, "resid": h_tok}
            else:  # only the rows going on need the whole FFN output and residual
                act_go, act_end = act.split([go, n_end])
                tok, unit = pairs
                end = (act_end.index_select(0, tok) * L.out.weight[unit]).sum(-1) + L.out.bias[unit]
                out = L.out(act_go)
                if ab is not None:
                    end, out = ab.apply_units(layer, "ffn_out", end, unit), ab.apply(layer, "ffn_out", out)
                h_tok = L.ln2(out + a.split([go, n_end])[0])
                if ab is not None:
                    h_tok = ab.apply(layer, "resid", h_tok)
                yield layer, {"attn_ctx": ctx, "attn_out": attn, "ffn_act": act, "ffn_out": out, "resid": h_tok,
                              "ffn_out_end": end}
            if not n_go:  # every row has ended
                return
            h = (h_tok if h_tok.shape[0] == go else h_tok.split([go, n_end])[0]).view(n_go, S, H)

    def read(self, inputs_embeds: torch.Tensor | None = None, row_top: torch.Tensor | None = None,
             input_ids: torch.Tensor | None = None, const_ends: bool = False) -> dict[str, torch.Tensor]:
        """{point: [rows, layers, width]}. `const_ends`: the first and last positions are the same
        in every row and need no gradient ([CLS] ... [SEP] from fixed embeddings)."""
        given = inputs_embeds if inputs_embeds is not None else input_ids
        n = given.shape[0]
        if row_top is None:
            row_top = torch.full((n,), self.max_layer, dtype=torch.long)
        plan = _Plan(row_top, self.max_layer, given.shape[1], self.position, given.device)
        store: dict[str, list[torch.Tensor]] = {pt: [] for pt in self.points}
        for layer, acts in self._pass(given, plan, inputs_embeds is None, const_ends):
            for pt in self.points:
                store[pt].append(F.pad(acts[pt][plan.at_p[layer]], (0, 0, 0, n - plan.alive[layer])))
        for v in store.values():  # layers above every row's top
            v.extend(torch.zeros_like(v[0]) for _ in range(self.max_layer + 1 - len(v)))
        return {pt: torch.stack(v, dim=1)[plan.inverse] for pt, v in store.items()}

    def read_sites(self, inputs_embeds: torch.Tensor, index: SiteIndex, const_ends: bool = False
                   ) -> torch.Tensor:
        """[rows, k]: the activation at each of `index`'s sites (0 in its padding slots)."""
        plan, gather = site_plan(index, inputs_embeds.shape[1], self.position, inputs_embeds.device)
        if torch.is_grad_enabled() and active(self.model) is None:
            layers = _layers(self.model)[: index.max_layer + 1]
            if hand_backward(layers, inputs_embeds.dtype, inputs_embeds.shape[1]):
                from ft.model.leangrad import LeanSites

                given = inputs_embeds if plan.sorted else inputs_embeds[plan.order]
                a = adapter(self.model)
                h = a.to_hidden(a.embed(inputs_embeds=given))
                return LeanSites.apply(h, layers, plan, gather, self.position, const_ends)
        values = [acts[source].reshape(-1).index_select(0, offsets)
                  for layer, acts in self._pass(inputs_embeds, plan, False, const_ends, gather.end_units)
                  for source, offsets in gather.reads[layer]]
        flat = torch.cat(values)
        out = flat.new_zeros(gather.size).index_copy(0, gather.slots, flat)
        return out.view(gather.shape)

    @staticmethod
    def flop_parts(model: nn.Module, index: SiteIndex, length: int, position: int,
                   hand: bool | None = None) -> dict[str, float]:
        """One step's FLOPs by kind: "forward" and "backward" (the linear layers' matmuls), "attention"
        (its forward; the backward is twice that), "ends" ([CLS]/[SEP] projected once in layer 0).
        The rows stop at their own top layer, whose FFN output is computed at the read units only.
        `hand` (default: where it applies to the model's dtype) is the hand-written backward
        (`ft.model.leangrad`): it projects the query gradient of a row's top layer at the read position only."""
        a = adapter(model)
        H, inter, S = a.hidden_size, a.intermediate_size, length + 2
        if hand is None:
            hand = hand_backward(_layers(model)[: index.max_layer + 1], next(model.parameters()).dtype, S)
        _, gather = site_plan(index, S, position, torch.device("cpu"))
        forward = backward = attention = 0.0
        for j in range(index.max_layer + 1):
            n, g = int((index.row_top >= j).sum()), int((index.row_top > j).sum())
            e = n - g
            width = S if j else S - 2  # layer 0: [CLS]/[SEP] are projected once
            units = gather.end_units[j]
            out_tokens = g * S + e if units is None else g * S
            out_units = 0 if units is None else len(units[0])
            rest = (g * S + e) * (H * H + H * inter) + out_tokens * H * inter + out_units * inter
            forward += 2 * (n * width * 3 * H * H + rest)
            q_tokens = g * width + e if hand else n * width  # the query projections' gradient
            backward += 2 * ((2 * n * width + q_tokens) * H * H + rest)
            attention += 4 * H * (g * S + e) * S  # ending rows: the read position's query only
        return {"forward": forward, "backward": backward, "attention": attention, "ends": 2 * 2 * 3 * H * H}

    @staticmethod
    def step_flops(model: nn.Module, index: SiteIndex, length: int, position: int, hand: bool | None = None) -> float:
        """FLOPs of one forward + backward of `index`'s rows through this reader (`flop_parts`)."""
        f = FastSiteReader.flop_parts(model, index, length, position, hand)
        return f["forward"] + f["backward"] + 3 * f["attention"] + f["ends"]
