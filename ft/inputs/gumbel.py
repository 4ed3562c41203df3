"""`input=gumbel`: e = gumbel_softmax(x, tau)·W_word with an annealed temperature (Poerner et al.)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ft.core.errors import ConfigError
from ft.inputs.base import InputParam, initial_onehot
from ft.inputs.registry import InputArgs, InputKind, register
from ft.inputs.softmax import SoftmaxInput


class GumbelInput(SoftmaxInput):
    """e = gumbel_softmax(x, tau)·W while training; noise-free softmax(x / tau) otherwise.

    `tau` is set each step by the control callback `ft.callbacks.TemperatureSchedule`, which asks
    any input that `anneals` (Poerner: geometric 2.0 -> 0.1). It is a buffer, so checkpoints resume it.
    """

    name = "gumbel"
    anneals = True

    def __init__(self, x0: torch.Tensor, tau_start: float = 2.0, tau_end: float = 0.1,
                 anneal_steps: int | None = None):
        super().__init__(x0)
        if not 0 < tau_end <= tau_start:
            raise ConfigError(f"input.tau_start={tau_start}, tau_end={tau_end}; valid: 0 < end <= start")
        self.tau_start, self.tau_end, self.anneal_steps = tau_start, tau_end, anneal_steps
        self.register_buffer("tau", torch.tensor(float(tau_start)))

    def tau_at(self, step: int, total: int) -> float:
        """Geometric schedule: tau_start at step 0, tau_end at step total - 1 and after."""
        frac = min(1.0, step / max(1, total - 1))
        return self.tau_start * (self.tau_end / self.tau_start) ** frac

    def anneal_total(self, max_steps: int) -> int:
        return int(self.anneal_steps or max_steps)

    def anneal(self, step: int, total: int) -> float:
        self.tau.fill_(self.tau_at(step, total))
        return float(self.tau)

    @property
    def temperature(self) -> float:
        return float(self.tau)

    @property
    def final_temperature(self) -> float:
        return float(self.tau_end)

    def probs(self, rows: slice = slice(None)) -> torch.Tensor:
        x = self.x[rows].float()
        if self.training:
            return F.gumbel_softmax(x, tau=float(self.tau), hard=False, dim=-1)
        return F.softmax(x / self.tau, dim=-1)


@register
class Gumbel(InputKind):
    name = "gumbel"
    summary = "e = gumbel_softmax(x, tau) · W_word, tau annealed tau_start -> tau_end; readout: argmax token"
    snaps_by_argmax = True

    def build(self, a: InputArgs) -> InputParam:
        x0 = initial_onehot(a.target_ids, a.length, a.word_embeddings.shape[0], a.init_std, a.seed)
        return GumbelInput(x0, a.tau_start, a.tau_end, a.anneal_steps)
