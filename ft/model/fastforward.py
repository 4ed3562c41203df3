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
from ft.model import lean_plan
from ft.model.ablate import active
from ft.model.arch import adapter
from ft.model.lean_plan import Layer, Plan, attend, lean_layers, project_qkv, site_plan
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


# read_sites with grad: one autograd node with a hand-written backward (ft.model.leangrad) where it applies
HAND_BACKWARD = True


def hand_backward(layers: list[Layer], dtype: torch.dtype, S: int) -> bool:
    """Whether `read_sites` with gradients (and no ablation) runs ft.model.leangrad's backward on these
    layers, for inputs of S positions in `dtype` (what `step_flops` counts too)."""
    from ft.model.leangrad import usable

    return HAND_BACKWARD and usable(layers, dtype, S)

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

    def _pass(self, given: torch.Tensor, plan: Plan, ids: bool, const_ends: bool,
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
        for layer, L in enumerate(lean_layers(self.model)[: self.max_layer + 1]):
            n_all, n_go = plan.alive[layer], plan.alive[layer + 1]  # rows here; rows going on
            qkv = project_qkv(h, L, layer == 0 and const_ends)
            sdpa, n_end, go = S > lean_plan.SHORT_SEQUENCE, n_all - n_go, n_go * S
            if not n_end:
                ctx, resid = attend(qkv, L.heads, sdpa), h.reshape(-1, H)
            else:  # rows ending here: only their read position goes on, as the only query
                qkv_go, qkv_end = qkv.split([n_go, n_end])
                h_go, h_end = h.split([n_go, n_end])
                ctx_end, resid_end = attend(qkv_end, L.heads, sdpa, query=self.position), h_end[:, self.position]
                ctx = torch.cat([attend(qkv_go, L.heads, sdpa), ctx_end]) if n_go else ctx_end
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
        plan = Plan(row_top, self.max_layer, given.shape[1], self.position, given.device)
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
            layers = lean_layers(self.model)[: index.max_layer + 1]
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
            hand = hand_backward(lean_layers(model)[: index.max_layer + 1], next(model.parameters()).dtype, S)
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


def __getattr__(name: str) -> object:  # a name that moved to another module still imports (ft.core.moved)
    from ft.core.moved import moved_attribute

    return moved_attribute(__name__, name)
