"""A lean forward pass of a BERT encoder that reads sites at one position.

Same arithmetic as Hugging Face's `BertLayer` (eval mode, no padding mask), organised for
activation maximization on short inputs:
- the query, key and value projections run as one fused matmul;
- each row stops at its own highest needed layer, and in that layer only the read
  position needs its attention output and FFN (the other positions only give keys and
  values): about 55% less work in a row's top layer;
- rows that stop at different layers share one pass whose batch shrinks as it climbs,
  so every matmul is as large as the batch allows.

`FastSiteReader` has the interface of `ft.sites.SiteReader`; `supports(model)` says whether
a model has the standard BERT layer structure this relies on (otherwise use the hooks).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ft.sites import POINTS, num_layers


def supports(model: nn.Module) -> bool:
    """True for BERT-style encoders whose layers this module reproduces exactly."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_decoder", False):
        return False
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return False
    try:
        block = model.encoder.layer[0]
        att = block.attention
        parts = (att.self.query, att.self.key, att.self.value, att.output.dense, att.output.LayerNorm,
                 block.intermediate.dense, block.intermediate.intermediate_act_fn, block.output.dense,
                 block.output.LayerNorm)
    except AttributeError:
        return False
    ok = all(isinstance(p, nn.Module) or callable(p) for p in parts)
    return ok and not getattr(block, "add_cross_attention", False) and hasattr(model, "embeddings")


class _Layer:
    """The weights of one layer, with Q, K, V (and K, V alone) concatenated once."""

    def __init__(self, block: nn.Module):
        s = block.attention.self
        self.heads = int(s.num_attention_heads)
        self.wq, self.bq = s.query.weight, s.query.bias
        self.wkv = torch.cat([s.key.weight, s.value.weight]).detach()
        self.bkv = torch.cat([s.key.bias, s.value.bias]).detach()
        self.wqkv = torch.cat([s.query.weight, s.key.weight, s.value.weight]).detach()
        self.bqkv = torch.cat([s.query.bias, s.key.bias, s.value.bias]).detach()
        self.attn_out, self.ln1 = block.attention.output.dense, block.attention.output.LayerNorm
        self.inter, self.act = block.intermediate.dense, block.intermediate.intermediate_act_fn
        self.out, self.ln2 = block.output.dense, block.output.LayerNorm


def _layers(model: nn.Module) -> list[_Layer]:
    key = tuple(p.data_ptr() for p in model.encoder.layer[0].attention.self.query.parameters())
    cache = getattr(model, "_ft_fast_layers", None)
    if cache is None or cache[0] != key:  # built once per model (and again after a device move)
        cache = (key, [_Layer(b) for b in model.encoder.layer])
        model._ft_fast_layers = cache
    return cache[1]


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    n, s, h = t.shape
    return t.view(n, s, heads, h // heads).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    ctx = F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads))
    n, _, s, d = ctx.shape
    return ctx.transpose(1, 2).reshape(n, s, heads * d)


class FastSiteReader:
    """Activations of whole points at one position for layers 0..max_layer (see module doc).

    Rows may stop at different layers (`row_top`): they share every layer's matmuls up to
    their own top, so a mixed batch of targets runs as one pass whose batch shrinks as it
    climbs. Values above a row's top layer are zeros (never read by a `SiteIndex`).
    """

    def __init__(self, model: nn.Module, points: Iterable[str], max_layer: int, position: int):
        self.model = model
        self.points = tuple(p for p in POINTS if p in set(points))
        self.max_layer = max_layer
        self.position = position
        if not 0 <= max_layer < num_layers(model):
            raise ValueError(f"layer {max_layer} out of range; valid 0..{num_layers(model) - 1}")

    def read(self, inputs_embeds: torch.Tensor | None = None, row_top: torch.Tensor | None = None,
             input_ids: torch.Tensor | None = None, const_ends: bool = False) -> dict[str, torch.Tensor]:
        """`const_ends`: the first and last positions are the same in every row and need no
        gradient ([CLS] ... [SEP] from fixed embeddings), so layer 0 projects them once."""
        given = inputs_embeds if inputs_embeds is not None else input_ids
        n, p, device = given.shape[0], self.position, given.device
        if row_top is None:
            row_top = torch.full((n,), self.max_layer, dtype=torch.long)
        order = torch.argsort(row_top.cpu(), descending=True, stable=True)
        # rows that reach each layer (and 0 past the top): a suffix sum of per-layer counts
        counts = torch.bincount(row_top.cpu(), minlength=self.max_layer + 1)[: self.max_layer + 1]
        alive = counts.flip(0).cumsum(0).flip(0).tolist() + [0]
        if not bool((order == torch.arange(n)).all()):
            given = given[order.to(device)]
        store: dict[str, list[torch.Tensor]] = {pt: [] for pt in self.points}
        if inputs_embeds is not None:
            h = self.model.embeddings(inputs_embeds=given)
        else:
            h = self.model.embeddings(input_ids=given)
        S, H = h.shape[1], h.shape[2]
        for layer, L in enumerate(_layers(self.model)[: self.max_layer + 1]):
            n_all, n_go = alive[layer], alive[layer + 1]  # rows at this layer; rows going on
            h = h[:n_all]
            if layer == 0 and const_ends and S > 2:
                ends = F.linear(h[:1, [0, S - 1]].detach(), L.wqkv, L.bqkv)
                # a 2-D matmul: a strided 3-D slice would make F.linear fall back to a batched
                # matmul with the weight repeated per row (~30x slower)
                mid = F.linear(h[:, 1:-1].reshape(-1, H), L.wqkv, L.bqkv).view(n_all, S - 2, -1)
                qkv = torch.cat([ends[:, :1].expand(n_all, 1, -1), mid, ends[:, 1:].expand(n_all, 1, -1)], 1)
            else:
                qkv = F.linear(h, L.wqkv, L.bqkv)
            q, k, v = qkv.chunk(3, dim=-1)
            # rows going on need every position; rows ending here only the read position
            ctx_go = _attend(q[:n_go], k[:n_go], v[:n_go], L.heads)
            ctx_end = _attend(q[n_go:, p : p + 1], k[n_go:], v[n_go:], L.heads)
            tokens = torch.cat([ctx_go.reshape(-1, H), ctx_end.reshape(-1, H)])
            resid = torch.cat([h[:n_go].reshape(-1, H), h[n_go:, p]])
            a = L.ln1(L.attn_out(tokens) + resid)
            act = L.act(L.inter(a))
            out = L.out(act)
            h_tok = L.ln2(out + a)
            at_p = torch.cat([torch.arange(n_go) * S + p, torch.arange(n_go * S, n_go * S + n_all - n_go)])
            at_p = at_p.to(device)
            for pt, t in (("ffn_act", act), ("ffn_out", out), ("resid", h_tok)):
                if pt in store:
                    store[pt].append(F.pad(t[at_p], (0, 0, 0, n - n_all)))
            h = h_tok[: n_go * S].view(n_go, S, H)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n)
        inverse = inverse.to(device)
        return {pt: torch.stack(v, dim=1)[inverse] for pt, v in store.items()}
