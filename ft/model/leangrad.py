"""A hand-written backward for the lean forward's site reads (`FastSiteReader.read_sites`).

Autograd records every view, split and concatenation of the lean pass and replays them
backward: the gradients of the rows that go on and the rows that end are concatenated, the site
reads are scattered into zero-filled activations, and the broadcast attention's products are
reduced by generic kernels. `LeanSites` runs the same arithmetic as one autograd node:
- forward, under no_grad, keeps per layer only what its backward needs (Q, K, V and the
  attention weights, the LayerNorm inputs with their mean and 1/std, the FFN's pre-activation);
- backward walks the layers down, adds each site's gradient where it was read, and writes
  every gradient straight into one buffer per tensor (no concatenation, no zero-filled copies).

It covers what optimization runs: float32 or float64 outside autocast, short inputs (the
broadcast attention), LayerNorm modules, an erf or tanh GELU or ReLU, no ablation; `usable`
says so, and `FastSiteReader` uses the autograd path otherwise. The encoder is frozen: only the
input's gradient is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ft.model import lean_plan
from ft.model.lean_plan import Layer, Plan, SiteGather, project_qkv


def _gelu_form(act: object) -> str | None:
    """'none' (erf) or 'tanh' for a GELU that F.gelu computes exactly like `act`, 'relu', or None."""
    import functools

    from transformers.activations import GELUActivation, PytorchGELUTanh

    if isinstance(act, nn.GELU):
        return act.approximate
    inner = getattr(act, "act", None)  # the HF modules' function: F.gelu, or their Python formula
    if isinstance(act, PytorchGELUTanh) and isinstance(inner, functools.partial) and inner.func is F.gelu:
        return inner.keywords.get("approximate")
    if isinstance(act, GELUActivation) and inner is F.gelu:
        return "none"
    if isinstance(act, nn.ReLU) or act is F.relu:
        return "relu"
    return None


def usable(layers: list[Layer], dtype: torch.dtype, S: int) -> bool:
    """True when `LeanSites` reproduces these layers on this input (see the module doc)."""
    if dtype not in (torch.float32, torch.float64) or S > lean_plan.SHORT_SEQUENCE:
        return False
    if torch.is_autocast_enabled(torch.device("cpu").type) or torch.is_autocast_enabled("cuda"):
        return False
    return all(isinstance(L.ln1, nn.LayerNorm) and isinstance(L.ln2, nn.LayerNorm)
               and _act_form(L) is not None for L in layers)


def _act_form(L: Layer) -> str | None:
    """`_gelu_form` of a layer's activation, found once per layer."""
    if not hasattr(L, "act_form"):
        L.act_form = _gelu_form(L.act)
    return L.act_form


def _activate(z: torch.Tensor, form: str) -> torch.Tensor:
    return F.relu(z) if form == "relu" else F.gelu(z, approximate=form)


def _activate_backward(g: torch.Tensor, z: torch.Tensor, form: str) -> torch.Tensor:
    if form == "relu":
        return g * (z > 0)
    return torch.ops.aten.gelu_backward(g, z, approximate=form)


def _norm(x: torch.Tensor, ln: nn.LayerNorm) -> tuple[torch.Tensor, tuple]:
    out, mean, rstd = torch.native_layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    return out, (x, mean, rstd, ln)


def _norm_backward(g: torch.Tensor, saved: tuple) -> torch.Tensor:
    x, mean, rstd, ln = saved
    return torch.ops.aten.native_layer_norm_backward(g, x, ln.normalized_shape, mean, rstd, ln.weight,
                                                     ln.bias, [True, False, False])[0]


def _attend(qkv: torch.Tensor, heads: int, query: int | None, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Broadcast self-attention (as `ft.model.lean_plan.attend`) of [n, S, 3H] projections, written into
    `out` [n * S_q, H]. Returns what the backward needs: the weights w [n, S_q, S, heads] and the
    broadcast views of q, k, v and w."""
    n, S, H3 = qkv.shape
    H = H3 // 3
    d = H // heads
    q, k, v = qkv.view(n, S, 3, heads, d).unbind(2)  # [n, S, heads, d] each
    if query is not None:
        q = q[:, query : query + 1]
    qb, kb, vb = q.unsqueeze(2), k.unsqueeze(1), v.unsqueeze(1)
    w = ((qb * kb).sum(-1) * d**-0.5).softmax(dim=2)  # [n, S_q, S_k, heads]
    wb = w.unsqueeze(-1)
    torch.sum(wb * vb, 2, out=out.view(n, -1, heads, d))
    return w, qb, kb, vb, wb


def _attend_backward(g: torch.Tensor, saved: tuple[torch.Tensor, ...], gk: torch.Tensor, gv: torch.Tensor
                     ) -> torch.Tensor:
    """The gradient of `_attend` for the context gradient `g` [n * S_q, H]: the keys' and values'
    are written into `gk`, `gv` [n, S, H]; the queries' [n * S_q, H] is returned."""
    w, qb, kb, vb, wb = saved
    n, S_q, S, heads = w.shape
    d = kb.shape[-1]
    g = g.view(n, S_q, 1, heads, d)
    gw = (g * vb).sum(-1)  # [n, S_q, S_k, heads]
    gs = torch._softmax_backward_data(gw, w, 2, w.dtype).mul_(d**-0.5).unsqueeze(-1)  # softmax, scale
    torch.sum(gs * qb, 1, out=gk.view(n, S, heads, d))
    torch.sum(wb * g, 1, out=gv.view(n, S, heads, d))
    return (gs * kb).sum(2).view(-1, heads * d)


@dataclass
class _Saved:
    """What one layer's backward needs."""

    n_all: int
    n_go: int
    att_go: tuple | None  # `_attend`'s saved tensors for the rows going on (every query)
    att_end: tuple | None  # ... for the rows ending here (the read position's query)
    ln1: tuple
    z: torch.Tensor  # the FFN's pre-activation [tokens, I]
    ln2: tuple
    end_rows: tuple[torch.Tensor, torch.Tensor] | None  # W_out rows and bias at the end units


class LeanSites(torch.autograd.Function):
    """[rows, k] site values of `gather` from the embedded input `h` [rows, S, H] (sorted as
    `plan.order`), through `layers`; `const_ends`: positions 0 and S-1 are the same in every row.
    Tokens per layer as in `ft.model.fastforward`: every position of the rows going on, then the read
    position of the rows ending there."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, layers: list[Layer], plan: Plan, gather: SiteGather,
                position: int, const_ends: bool) -> torch.Tensor:
        n, S, H = h.shape
        p = position
        saved: list[_Saved] = []
        values: list[torch.Tensor] = []
        for layer, L in enumerate(layers):
            n_all, n_go = plan.alive[layer], plan.alive[layer + 1]
            n_end, go = n_all - n_go, n_go * S
            qkv = project_qkv(h, L, layer == 0 and const_ends)
            acts: dict[str, torch.Tensor] = {}
            take = partial(_take, acts, dict(gather.reads[layer]))  # each read before an in-place update
            ctx_tok = h.new_empty(go + n_end, H)
            att_go = _attend(qkv[:n_go], L.heads, None, ctx_tok[:go]) if n_go else None
            att_end = _attend(qkv[n_go:], L.heads, p, ctx_tok[go:]) if n_end else None
            take("attn_ctx", ctx_tok)
            x1 = F.linear(ctx_tok, L.attn_out.weight, L.attn_out.bias)
            take("attn_out", x1)
            x1[:go] += h[:n_go].reshape(-1, H)  # the residual
            x1[go:] += h[n_go:, p]
            a, ln1 = _norm(x1, L.ln1)
            z = F.linear(a, L.inter.weight, L.inter.bias)
            form = _act_form(L)
            act = _activate(z, form)
            take("ffn_act", act)
            pairs = gather.end_units[layer] if n_end else None
            end_rows = None
            if pairs is None:
                x2 = F.linear(act, L.out.weight, L.out.bias)
            else:  # the ending rows' FFN output at their read units only
                tok, unit = pairs
                end_rows = _end_rows(gather, layer, L, unit)
                take("ffn_out_end", (act[go:].index_select(0, tok) * end_rows[0]).sum(-1) + end_rows[1])
                x2 = F.linear(act[:go], L.out.weight, L.out.bias)
            take("ffn_out", x2)
            x2 += a[: len(x2)]
            h_tok, ln2 = _norm(x2, L.ln2)
            take("resid", h_tok)
            values += [acts[source] for source, _ in gather.reads[layer]]
            saved.append(_Saved(n_all, n_go, att_go, att_end, ln1, z, ln2, end_rows))
            if not n_go:
                break
            h = h_tok[:go].view(n_go, S, H)
        flat = torch.cat(values)
        ctx.saved = saved
        ctx.layers, ctx.plan, ctx.gather, ctx.position, ctx.const_ends = layers, plan, gather, p, const_ends
        ctx.shape = (n, S, H)
        return flat.new_zeros(gather.size).index_copy(0, gather.slots, flat).view(gather.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        gather, p = ctx.gather, ctx.position
        _, S, H = ctx.shape
        flat = grad.reshape(-1).index_select(0, gather.slots)  # in the order the forward read them
        sizes = [len(offsets) for reads in gather.reads for _, offsets in reads]
        pieces = iter(flat.split(sizes))
        site_grads = [[(source, offsets, next(pieces)) for source, offsets in reads] for reads in gather.reads]
        g_h = None  # the gradient of the hidden state a layer hands on [n_go, S, H]
        for layer in range(len(ctx.saved) - 1, -1, -1):
            s, L = ctx.saved[layer], ctx.layers[layer]
            n_all, n_go = s.n_all, s.n_go
            n_end, go, form = n_all - n_go, n_go * S, _act_form(L)
            tokens = go + n_end
            reads = {source: (offsets, g) for source, offsets, g in site_grads[layer]}
            add = partial(_add_sites, reads)

            # the residual stream this layer hands on: every token if the top layer's FFN output
            # was computed whole, else the rows going on
            rows_out = tokens if s.end_rows is None else go
            if g_h is not None and rows_out == go:
                g_tok = g_h.view(go, H)
            else:
                g_tok = grad.new_zeros(rows_out, H)
                if g_h is not None:
                    g_tok[:go] = g_h.view(go, H)
            g_x2 = _norm_backward(add(g_tok, "resid"), s.ln2)  # = the gradient of out and of a
            g_out = add(g_x2.clone(), "ffn_out") if "ffn_out" in reads else g_x2
            g_act = grad.new_empty(tokens, s.z.shape[1])
            torch.mm(g_out, L.out.weight, out=g_act[:rows_out])
            if s.end_rows is not None:
                g_act[go:] = 0
                if "ffn_out_end" in reads:
                    g_end = reads["ffn_out_end"][1]
                    g_act[go:].index_add_(0, gather.end_units[layer][0], g_end.unsqueeze(1) * s.end_rows[0])
            g_z = _activate_backward(add(g_act, "ffn_act"), s.z, form)
            g_a = g_z @ L.inter.weight
            g_a[:rows_out] += g_x2
            g_x1 = _norm_backward(g_a, s.ln1)  # = the gradient of attn and of the residual
            g_attn = add(g_x1.clone(), "attn_out") if "attn_out" in reads else g_x1
            g_ctx = add(g_attn @ L.attn_out.weight, "attn_ctx")
            # Q, K and V separately: their gradients need no interleaving into one [.., 3H] buffer
            gk, gv = grad.new_empty(2, n_all, S, H).unbind(0)
            gq_go = _attend_backward(g_ctx[:go], s.att_go, gk[:n_go], gv[:n_go]) if n_go else None
            gq_end = _attend_backward(g_ctx[go:], s.att_end, gk[n_go:], gv[n_go:]) if n_end else None
            wq, wk, wv = L.wqkv.split(H)
            ends = layer == 0 and ctx.const_ends and S > 2  # the constant ends need no gradient
            span = slice(1, S - 1) if ends else slice(None)
            width = S - 2 if ends else S
            mid = torch.mm(gk[:, span].reshape(-1, H), wk).view(n_all, width, H)
            mid.view(-1, H).addmm_(gv[:, span].reshape(-1, H), wv)
            if n_go:
                mid[:n_go].view(-1, H).addmm_(gq_go.view(n_go, S, H)[:, span].reshape(-1, H), wq)
            if n_end:
                mid[n_go:, p - (1 if ends else 0)] += gq_end @ wq
            if ends:
                g_h = grad.new_zeros(n_all, S, H)
                g_h[:, span] = mid
            else:
                g_h = mid
            g_h[:n_go] += g_x1[:go].view(n_go, S, H)  # the residual
            g_h[n_go:, p] += g_x1[go:]
        return g_h, None, None, None, None, None


def _take(acts: dict[str, torch.Tensor], want: dict[str, torch.Tensor], source: str, t: torch.Tensor) -> None:
    """acts[source] = the values of `t` at the flat offsets `want[source]` (if it is read)."""
    if source in want:
        acts[source] = t.reshape(-1).index_select(0, want[source])


def _add_sites(reads: dict[str, tuple[torch.Tensor, torch.Tensor]], buf: torch.Tensor, source: str) -> torch.Tensor:
    """Add the site gradients read from `source` (flat offsets, values) into its gradient `buf`."""
    if source in reads:
        buf.view(-1).index_add_(0, *reads[source])
    return buf


def _end_rows(gather: SiteGather, layer: int, L: Layer, unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W_out's rows and bias at a layer's end units ([u, I], [u]), gathered once per plan and weights."""
    cache = gather.__dict__.setdefault("_end_rows", {})
    key = (layer, L.out.weight.data_ptr(), L.out.weight.dtype)
    if key not in cache:
        cache[key] = (L.out.weight.detach()[unit], L.out.bias.detach()[unit])
    return cache[key]
