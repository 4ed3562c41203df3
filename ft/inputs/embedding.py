"""`input=embedding`: e optimized directly in the word-embedding space (Poerner's "embfree")."""

from __future__ import annotations

import torch
from torch import nn

from ft.inputs.base import InputParam, initial_embeds
from ft.inputs.registry import InputArgs, InputKind, register


class EmbeddingInput(InputParam):
    """Optimize e directly in the word-embedding space (Poerner's "embfree")."""

    name = "embedding"

    def __init__(self, e0: torch.Tensor):
        super().__init__()
        self.e = nn.Parameter(e0.clone())

    def embeds(self, word_embeddings: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        return self.e[rows]


@register
class Embedding(InputKind):
    name = "embedding"
    summary = "e optimized directly in the word-embedding space, from x0 · W_word; readout: nearest word"

    def build(self, a: InputArgs) -> InputParam:
        return EmbeddingInput(initial_embeds(a.target_ids, a.length, a.word_embeddings, a.init_std, a.seed))
