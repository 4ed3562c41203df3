"""`input=projected`: PEZ (Wen et al. 2023), a continuous input whose forward pass uses its nearest
vocabulary tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ft.inputs.base import InputParam, random_tokens
from ft.inputs.registry import InputArgs, InputKind, build_input, register


class ProjectedInput(InputParam):
    """PEZ (Wen et al. 2023): a continuous e [T, l, E] whose forward pass uses its nearest
    vocabulary tokens (cosine, over the non-special tokens); the gradient at the projection
    updates e (straight-through: embeds = e + (W[nearest] - e).detach()). It starts at the
    embeddings of random tokens, seeded per target."""

    name = "projected"

    def __init__(self, e0: torch.Tensor, allowed: torch.Tensor):
        super().__init__()
        self.e = nn.Parameter(e0.clone())
        self.register_buffer("allowed", allowed.clone(), persistent=False)  # [V'] token ids

    def nearest(self, word_embeddings: torch.Tensor, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """[r, l] the token id nearest (cosine) to each row's continuous input."""
        with torch.no_grad():
            allowed = self.allowed.to(word_embeddings.device)
            words = F.normalize(word_embeddings[allowed].float(), dim=-1)  # [V', E]
            e = F.normalize(self.e[rows].detach().float(), dim=-1)  # [r, l, E]
            return allowed[(e @ words.T).argmax(-1)]

    def embeds(self, word_embeddings: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        e = self.e[rows]
        projected = word_embeddings[self.nearest(word_embeddings, rows)].to(e.dtype)
        return e + (projected - e).detach()

    def discrete_ids(self, word_embeddings: torch.Tensor) -> torch.Tensor:
        return self.nearest(word_embeddings)

    def extra_tensors(self, word_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"continuous": self.e.detach()}  # the continuous copy behind the projection


@register
class Projected(InputKind):
    name = "projected"
    summary = "PEZ: a continuous input whose forward pass uses its nearest tokens (cosine); result: those tokens"
    target = "ft.inputs.build_projected"
    needs_vocabulary_ids = True
    yields_tokens = True

    def build(self, a: InputArgs) -> InputParam:
        """e0 = the embeddings of `length` random allowed tokens per target."""
        allowed = a.allowed.cpu()
        ids = random_tokens(a.target_ids, a.length, allowed, a.seed)
        return ProjectedInput(a.word_embeddings.detach().float().cpu()[ids], allowed)


def build_projected(target_ids: Sequence[int], word_embeddings: torch.Tensor, allowed: torch.Tensor,
                    length: int = 1, seed: int = 0, **_: object) -> ProjectedInput:
    """input=projected (configs/input/projected.yaml's `_target_`): e0 = the embeddings of `length`
    random allowed tokens per target."""
    return build_input("projected", target_ids, word_embeddings, length=length, seed=seed, allowed=allowed)
