"""`input=softmax`: e = softmax(x)·W_word, a point in the convex hull of the word embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ft.inputs.base import InputParam, initial_onehot
from ft.inputs.registry import InputArgs, InputKind, register


class SoftmaxInput(InputParam):
    """e = softmax(x)·W: a point in the convex hull of the word embeddings (Poerner)."""

    name = "softmax"
    probabilistic = True

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x = nn.Parameter(x0.clone())

    def probs(self, rows: slice = slice(None)) -> torch.Tensor:
        return F.softmax(self.x[rows].float(), dim=-1)

    def embeds(self, word_embeddings: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        return self.probs(rows).to(word_embeddings.dtype) @ word_embeddings

    def logits(self) -> torch.Tensor:
        return self.x.detach()


@register
class Softmax(InputKind):
    name = "softmax"
    summary = "e = softmax(x) · W_word over the vocabulary (Poerner et al.); readout: argmax token"
    snaps_by_argmax = True

    def build(self, a: InputArgs) -> InputParam:
        return SoftmaxInput(initial_onehot(a.target_ids, a.length, a.word_embeddings.shape[0], a.init_std, a.seed))
