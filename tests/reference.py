"""Independent reference computations for tests: plain Hugging Face modules and hooks, no ft code.

A wrong wiring inside ft (another space, another position, another selection) disagrees with
these; they share nothing with ft's readers, sweeps or metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

HF_MODULE = {"ffn_out": lambda blk: blk.output.dense, "ffn_act": lambda blk: blk.intermediate,
             "resid": lambda blk: blk}


@torch.no_grad()
def hf_points(model: torch.nn.Module, **inputs: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Every point of every layer by forward hooks: point -> per layer [B, S, width]."""
    seen: dict[str, list[torch.Tensor]] = {p: [None] * len(model.encoder.layer) for p in HF_MODULE}
    hooks = []
    for layer, blk in enumerate(model.encoder.layer):
        for point, get in HF_MODULE.items():
            def keep(m, i, o, point=point, layer=layer):
                seen[point][layer] = (o[0] if isinstance(o, tuple) else o).detach().float()
            hooks.append(get(blk).register_forward_hook(keep))
    try:
        model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def site_mean(acts: dict[str, list[torch.Tensor]], sites: Sequence[str], position: int) -> torch.Tensor:
    """[B] mean over site strings `layer.L.point.unit` of the activation at `position`."""
    vals = []
    for s in sites:
        _, layer, point, unit = s.split(".")
        vals.append(acts[point][int(layer)][:, position, int(unit)])
    return torch.stack(vals).mean(0)


def frame(model: torch.nn.Module, tokenizer: object, embeds: torch.Tensor) -> torch.Tensor:
    """[CLS] embeds [SEP] as inputs_embeds: [T, l + 2, H]."""
    W = model.get_input_embeddings().weight.detach()
    n = len(embeds)
    return torch.cat([W[tokenizer.cls_token_id].expand(n, 1, -1), embeds,
                      W[tokenizer.sep_token_id].expand(n, 1, -1)], 1)


@torch.no_grad()
def word_points(model: torch.nn.Module, tokenizer: object, ids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Every point at every position for each `[CLS] w [SEP]` (one batch over `ids`)."""
    seq = torch.stack([torch.full_like(ids, tokenizer.cls_token_id), ids,
                       torch.full_like(ids, tokenizer.sep_token_id)], 1)
    return hf_points(model, input_ids=seq)


@torch.no_grad()
def analysis_by_hand(model: torch.nn.Module, embeds: torch.Tensor, first_position: int) -> torch.Tensor:
    """LayerNorm(embeds + position + segment-0 embedding), embeds [N, l, H] starting at `first_position`."""
    emb = model.embeddings
    pos = emb.position_embeddings.weight[first_position : first_position + embeds.shape[1]]
    return emb.LayerNorm(embeds + pos + emb.token_type_embeddings.weight[0]).float()


def cosine_top(a: torch.Tensor, vectors: torch.Tensor, n: int) -> tuple[list[int], torch.Tensor]:
    """Rows of the n vectors nearest `a` [H] by cosine, and all cosines [V]."""
    cos = (vectors @ a) / (vectors.norm(dim=-1) * a.norm())
    return cos.argsort(descending=True)[:n].tolist(), cos
