"""The pieces every parameterization of the trainable input shares: the `InputParam` base class
and the per-target initializers. The parameterizations themselves are one file per `input.kind`
(ft.inputs.onehot, .embedding, .softmax, .gumbel, .projected, .tokens), each registered in
ft.inputs.registry.

Each holds one row per target and maps it into the embedding space consumed by the
encoder (``inputs_embeds``), for the l optimized positions between [CLS] and [SEP].
Initialization is per target id, so a target starts from the same point whatever batch,
shard or device it lands in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from ft.core.errors import ConfigError


def initial_row(tid: int, length: int, vocab_size: int, std: float, seed: int) -> torch.Tensor:
    """x0 ~ N(0, std^2) in the one-hot input space for target `tid`: [length, vocab]."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + int(tid))
    return torch.randn(length, vocab_size, generator=g) * std


def initial_onehot(
    target_ids: Sequence[int], length: int, vocab_size: int, std: float, seed: int
) -> torch.Tensor:
    """x0 for every target: [targets, length, vocab]."""
    if length < 1:
        raise ConfigError(f"input.length={length}; valid: an integer >= 1")
    return torch.stack([initial_row(t, length, vocab_size, std, seed) for t in target_ids])


def initial_embeds(
    target_ids: Sequence[int], length: int, W: torch.Tensor, std: float, seed: int
) -> torch.Tensor:
    """x0 · W for every target, one row at a time (never holds [targets, vocab])."""
    if length < 1:
        raise ConfigError(f"input.length={length}; valid: an integer >= 1")
    W = W.detach().float().cpu()
    return torch.stack([initial_row(t, length, W.shape[0], std, seed) @ W for t in target_ids])


def random_tokens(target_ids: Sequence[int], length: int, allowed: torch.Tensor, seed: int) -> torch.Tensor:
    """[targets, l] random items of `allowed` (token ids), seeded per target (never corpus text)."""
    out = []
    for tid in target_ids:
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(tid))
        out.append(allowed[torch.randint(len(allowed), (length,), generator=g)])
    return torch.stack(out)


def is_linear_optimizer(make: Callable[..., torch.optim.Optimizer]) -> bool:
    """True for optimizers whose step is linear in past gradients: plain/momentum SGD."""
    func = make.func if isinstance(make, partial) else make
    kw = make.keywords if isinstance(make, partial) else {}
    return func is torch.optim.SGD and not kw.get("weight_decay")


class InputParam(nn.Module):
    """Base: `embeds(W, rows)` gives the embedding-space input [rows, length, hidden].

    Callers ask the object, never its class: `probabilistic` (+ `probs`, `logits`) for a
    distribution over the vocabulary, `discrete_ids` for an input that stands for tokens,
    `anneals` (+ `anneal_total`, `anneal`, `temperature`, `final_temperature`) for a temperature
    that `ft.callbacks.TemperatureSchedule` sets before every step."""

    name: str = "base"
    probabilistic: bool = False  # True: a distribution over the vocabulary per token (`probs`)
    anneals: bool = False  # True: a temperature set before every step (`anneal`)

    def logits(self) -> torch.Tensor | None:
        """[T, l, vocab] scores whose argmax is the discrete readout (probabilistic kinds)."""
        return None

    def probs(self, rows: slice = slice(None)) -> torch.Tensor:
        """[r, l, vocab] the distribution over the vocabulary (probabilistic kinds)."""
        raise NotImplementedError(f"input={self.name} is not a distribution over the vocabulary")

    def embeds(self, word_embeddings: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        raise NotImplementedError

    def extra_tensors(self, word_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors besides `embeds` worth saving in inputs.safetensors."""
        return {}

    def discrete_ids(self, word_embeddings: torch.Tensor) -> torch.Tensor | None:
        """[T, l] the token ids the input stands for, for inputs that are tokens (else None)."""
        return None

    # the temperature schedule (inputs that anneal)
    def anneal_total(self, max_steps: int) -> int:
        """Steps the temperature schedule spans (its own setting, else the run's `max_steps`)."""
        return int(max_steps)

    def anneal(self, step: int, total: int) -> float:
        """Set the temperature for `step` of a `total`-step schedule; returns it."""
        raise NotImplementedError(f"input={self.name} has no temperature")

    @property
    def temperature(self) -> float | None:
        """The temperature now (None: the input has none)."""
        return None

    @property
    def final_temperature(self) -> float | None:
        """The temperature the schedule ends at (None: the input has none)."""
        return None

    @property
    def param(self) -> nn.Parameter:
        [p] = list(self.parameters())
        return p

    def set_rows(self, value: torch.Tensor) -> None:
        """Replace the trainable tensor (a shard of rows, or all rows gathered back)."""
        name = next(n for n, _ in self.named_parameters())
        setattr(self, name, nn.Parameter(value.detach().clone()))
