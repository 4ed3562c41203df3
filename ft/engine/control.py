"""Which rows go on: divergence, convergence, freezing, and when the run stops."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from ft.engine.state import RowState


class ConvergenceControl(pl.Callback):
    """After every step, on the module's `state` (a `RowState`):

    - a row whose objective is not finite is marked diverged and frozen (the others go on);
    - a row has converged when its objective changed by at most `tol` (relative to its value)
      over the last `window` steps;
    - `freeze_converged`: converged rows stop being optimized (their step is `stopped_at`);
    - `stop_when_converged`: the run stops once every row has converged or diverged (on every
      rank: the decision is reduced across processes).

    The module returns its control from `configure_callbacks`, so every Trainer that fits it
    has one.
    """

    def __init__(self, window: int = 100, tol: float = 1e-4, stop_when_converged: bool = True,
                 freeze_converged: bool = False):
        self.window, self.tol = int(window), float(tol)
        self.stop_when_converged, self.freeze_converged = bool(stop_when_converged), bool(freeze_converged)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        self.observe(trainer, pl_module.state)

    def observe(self, trainer: pl.Trainer, state: RowState) -> None:
        """`state.last` holds the objective of step `state.step - 1`: record it and decide."""
        values = state.last
        state.history[(state.step - 1) % state.history.shape[0]] = values.to(state.history.dtype)
        bad = ~torch.isfinite(values) & ~state.diverged
        if bad.any():  # NaN/inf (lr too high, overflow): mark, freeze, go on with the others
            state.diverged |= bad
            state.frozen |= bad
            state.stopped_at[bad] = state.step
            rank_zero_warn(f"{int(bad.sum())} target(s) diverged (non-finite objective) at step "
                           f"{state.step}; they are frozen and reported as diverged")
            if bool(state.diverged.all()):
                trainer.should_stop = True
        done = self.converged(state) | state.diverged
        if self.freeze_converged:
            newly = done & ~state.frozen
            state.stopped_at[newly] = state.step
            state.frozen |= newly
        if self.stop_when_converged:
            stop = bool(done.all())
            if trainer.world_size > 1:
                stop = trainer.strategy.reduce_boolean_decision(stop, all=True)
            if stop:
                trainer.should_stop = True

    def converged(self, state: RowState) -> torch.Tensor:
        """[rows] bool: relative change over the last `window` steps <= tol."""
        if state.step <= self.window:
            return torch.zeros(state.rows, dtype=torch.bool, device=state.history.device)
        n = state.history.shape[0]
        now = state.history[(state.step - 1) % n]
        before = state.history[state.step % n]  # the oldest entry: `window` steps earlier
        return (now - before).abs() <= self.tol * now.abs().clamp_min(1e-8)
