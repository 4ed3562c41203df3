"""`input=onehot`: the paper's input space, x in R^vocab per token, e = x · W_word; literally
(`OneHotInput`) or on the exact hidden-space path (`OneHotFastInput`) when the optimizer allows it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ft.core.errors import ConfigError
from ft.inputs.base import InputParam, initial_embeds, initial_onehot, is_linear_optimizer
from ft.inputs.registry import InputArgs, InputKind, register


class OneHotInput(InputParam):
    """The paper's input space, literally: x in R^{vocab}, e = x · W_word (Poerner's "logits")."""

    name = "onehot"

    def __init__(self, x0: torch.Tensor, save_raw: bool = False):
        super().__init__()
        self.x = nn.Parameter(x0.clone())
        self.save_raw = save_raw

    def embeds(self, word_embeddings: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        return self.x[rows] @ word_embeddings.to(self.x.dtype)

    def onehot(self, word_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        return self.x.detach()

    def extra_tensors(self, word_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"onehot": self.onehot()} if self.save_raw else {}


class OneHotFastInput(InputParam):
    """The same input space, optimized exactly in the hidden-size space.

    SGD on x moves e = x·W by -lr·(∇x L)·W = -lr·(∇e L)·(WᵀW): so the trainable tensor
    is e, and a gradient hook multiplies ∇e by G = WᵀW. Any optimizer whose step is a
    linear combination of past gradients (SGD, momentum, Nesterov; no weight decay)
    then follows the literal trajectory. x is recovered on demand:
    x = x0 + (e - e0)·G⁻¹·Wᵀ, since x - x0 stays in the row space of Wᵀ.
    """

    name = "onehot"

    def __init__(self, target_ids: Sequence[int], length: int, word_embeddings: torch.Tensor,
                 std: float, seed: int, save_raw: bool = False):
        super().__init__()
        W = word_embeddings.detach().float()
        e0 = initial_embeds(target_ids, length, W, std, seed)
        self.e = nn.Parameter(e0.clone())
        self.register_buffer("gram", (W.T @ W).contiguous(), persistent=False)
        self.init = dict(target_ids=list(target_ids), length=length, std=std, seed=seed)
        self.save_raw = save_raw
        self.e.register_hook(self.precondition)

    def set_rows(self, value: torch.Tensor) -> None:
        super().set_rows(value)
        self.e.register_hook(self.precondition)

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        with torch.autocast(grad.device.type, enabled=False):  # exact, in the gradient's dtype
            return grad @ self.gram.to(grad.dtype)

    def embeds(self, word_embeddings: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        return self.e[rows]

    @torch.no_grad()
    def onehot(self, word_embeddings: torch.Tensor) -> torch.Tensor:
        """x [targets, length, vocab], recovered exactly (float64 solve)."""
        W = word_embeddings.detach().double().cpu()
        i = self.init
        x0 = initial_onehot(i["target_ids"], i["length"], W.shape[0], i["std"], i["seed"]).double()
        delta = self.e.detach().double().cpu() - x0 @ W
        d = torch.linalg.solve(W.T @ W, delta.reshape(-1, W.shape[1]).T).T
        return (x0 + (d @ W.T).reshape(x0.shape)).float()

    def extra_tensors(self, word_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"onehot": self.onehot(word_embeddings)} if self.save_raw else {}


def uses_fast_path(fast: bool | str, optimizer: object) -> bool:
    """input.fast: auto takes the exact hidden-space path when the optimizer allows it
    (`is_linear_optimizer`), true insists on it, false keeps the literal path."""
    linear = optimizer is not None and is_linear_optimizer(optimizer)
    if fast is True and not linear:
        raise ConfigError("input.fast=true needs optim=SGD without weight decay; use fast=auto")
    if fast is True or (fast == "auto" and linear):
        return True
    if fast not in (False, "auto"):
        raise ConfigError(f"input.fast={fast!r}; valid: auto, true, false")
    return False


@register
class OneHot(InputKind):
    name = "onehot"
    summary = "x in R^vocab per token, e = x · W_word (the paper's input space); readout: nearest word"

    def build(self, a: InputArgs) -> InputParam:
        if uses_fast_path(a.fast, a.optimizer):
            return OneHotFastInput(a.target_ids, a.length, a.word_embeddings, a.init_std, a.seed, a.save_raw)
        x0 = initial_onehot(a.target_ids, a.length, a.word_embeddings.shape[0], a.init_std, a.seed)
        return OneHotInput(x0, save_raw=a.save_raw)
