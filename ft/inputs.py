"""Parameterizations of the trainable input: the only trainable tensor of a run.

Each holds one row per target and maps it into the embedding space consumed by the
encoder (``inputs_embeds``), for the l optimized positions between [CLS] and [SEP].
Initialization is per target id, so a target starts from the same point whatever batch,
shard or device it lands in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ft.errors import ConfigError


def initial_onehot(
    target_ids: Sequence[int], length: int, vocab_size: int, std: float, seed: int
) -> torch.Tensor:
    """x0 ~ N(0, std^2) in the one-hot input space, [targets, length, vocab], seeded per target."""
    if length < 1:
        raise ConfigError(f"input.length={length}; valid: an integer >= 1")
    rows = []
    for tid in target_ids:
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(tid))
        rows.append(torch.randn(length, vocab_size, generator=g) * std)
    return torch.stack(rows)


class InputParam(nn.Module):
    """Base: `embeds(W, rows)` gives the embedding-space input [rows, length, hidden]."""

    name: str = "base"

    def embeds(self, word_embeddings: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        raise NotImplementedError

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors besides `embeds` worth saving in inputs.safetensors."""
        return {}


class OneHotInput(InputParam):
    """The paper's input space: x in R^{vocab}, e = x · W_word (Poerner's "logits")."""

    name = "onehot"

    def __init__(self, x0: torch.Tensor, save_raw: bool = False):
        super().__init__()
        self.x = nn.Parameter(x0.clone())
        self.save_raw = save_raw

    def embeds(self, word_embeddings: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        return self.x[rows] @ word_embeddings.to(self.x.dtype)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {"onehot": self.x.detach()} if self.save_raw else {}


class EmbeddingInput(InputParam):
    """Optimize e directly in the word-embedding space (Poerner's "embfree")."""

    name = "embedding"

    def __init__(self, x0: torch.Tensor, word_embeddings: torch.Tensor):
        super().__init__()
        self.e = nn.Parameter(x0 @ word_embeddings.detach().float())

    def embeds(self, word_embeddings: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        return self.e[rows]


def build_input(
    kind: str,
    target_ids: Sequence[int],
    word_embeddings: torch.Tensor,
    length: int = 1,
    init_std: float = 0.01,
    seed: int = 0,
    save_raw: bool = False,
) -> InputParam:
    """The parameterization named `kind`, initialized from the same x0 for every kind."""
    x0 = initial_onehot(target_ids, length, word_embeddings.shape[0], init_std, seed)
    if kind == "onehot":
        return OneHotInput(x0, save_raw=save_raw)
    if kind == "embedding":
        return EmbeddingInput(x0, word_embeddings)
    raise ConfigError(f"input.kind={kind!r}; valid: ['onehot', 'embedding']")
