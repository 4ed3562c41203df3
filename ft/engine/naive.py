"""The literal protocol the bench measures the engine against: one neuron at a time, SGD on the one-hot
input x, a full forward per step (no chunking, no lean reader).
"""

from __future__ import annotations

import torch

from ft.engine.module import full_sequence
from ft.inputs import initial_row
from ft.model.encoder import Encoder
from ft.model.sites import Site, register_point_hook
from ft.model.vocab import Vocabulary


def naive_textualize(enc: Encoder, site: Site, tid: int, steps: int, lr: float, vocab: Vocabulary,
                     init_std: float = 0.01, seed: int = 0) -> float:
    """One neuron, literal protocol: SGD on x in R^vocab; full forward; returns final activation."""
    model, W = enc.model, enc.word_embeddings
    x = initial_row(tid, 1, W.shape[0], init_std, seed).unsqueeze(0).to(W.device).requires_grad_(True)
    opt = torch.optim.SGD([x], lr=lr)
    seen: dict[str, torch.Tensor] = {}

    def keep(t: torch.Tensor) -> None:
        seen["act"] = t[0, 1, site.unit]

    hook = register_point_hook(model, site.layer, site.point, keep)
    try:
        for _ in range(steps + 1):
            seq = full_sequence(x @ W, W, vocab.cls_id, vocab.sep_id)
            model(inputs_embeds=seq)
            if _ == steps:
                return float(seen["act"])
            opt.zero_grad()
            (-seen["act"]).backward()
            opt.step()
    finally:
        hook.remove()
    raise AssertionError("unreachable")
