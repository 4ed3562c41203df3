"""`input=tokens`: l real vocabulary tokens per row, the state of the gradient-guided token search
(ft.engine.search, which runs instead of gradient steps: `swap_search`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ft.inputs.base import InputParam, random_tokens
from ft.inputs.registry import InputArgs, InputKind, build_input, register

MAX_LENGTH = 32


class TokenInput(InputParam):
    """l token ids per row (the search's state); `embeds` looks them up in W_word."""

    name = "tokens"

    def __init__(self, ids: torch.Tensor, allowed: torch.Tensor):
        super().__init__()
        self.ids = nn.Parameter(ids.clone(), requires_grad=False)  # [rows, l] long
        self.register_buffer("allowed", allowed.clone(), persistent=False)  # [vocab] token ids to propose

    def embeds(self, word_embeddings: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        return word_embeddings[self.ids[rows]]

    def set_rows(self, value: torch.Tensor) -> None:
        self.ids = nn.Parameter(value.detach().clone().long(), requires_grad=False)

    def discrete_ids(self, word_embeddings: torch.Tensor) -> torch.Tensor:
        return self.ids.detach()


def initial_tokens(init_ids: Sequence[int], length: int, allowed: torch.Tensor, seed: int) -> torch.Tensor:
    """[rows, l] random vocabulary items, seeded per row (never corpus text)."""
    return random_tokens(init_ids, length, allowed, seed)


@register
class Tokens(InputKind):
    name = "tokens"
    summary = "real tokens found by gradient-guided token search (GCG's swap step, search.*); no optimizer"
    target = "ft.engine.search.build_token_input"
    needs_vocabulary_ids = True
    swap_search = True
    yields_tokens = True
    max_length = MAX_LENGTH

    def build(self, a: InputArgs) -> InputParam:
        allowed = a.allowed.cpu()
        return TokenInput(initial_tokens(a.target_ids, a.length, allowed, a.seed), allowed)


def build_token_input(target_ids: Sequence[int], word_embeddings: torch.Tensor, allowed: torch.Tensor,
                      length: int = 1, seed: int = 0, **_: object) -> TokenInput:
    """input=tokens (configs/input/tokens.yaml's `_target_`, through ft.engine.search)."""
    return build_input("tokens", target_ids, word_embeddings, length=length, seed=seed, allowed=allowed)
