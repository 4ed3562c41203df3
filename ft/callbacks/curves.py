"""Activation curves: the objective per step, as mean/min/max and per target."""

from __future__ import annotations

import pytorch_lightning as pl
import torch


class ActivationCurves(pl.Callback):
    """Logs `act/mean|min|max` every step (the activation objective alone; the token search's
    fluency term goes to `fluency/mean`), `act_target/tNNNN` for the first targets, and
    `engine/active_targets`: how many still move (the rest converged and were frozen, or diverged)."""

    def __init__(self, max_targets: int = 16):
        self.max_targets = max_targets

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: object, batch: object, batch_idx: int) -> None:
        state = getattr(pl_module, "state", None)
        if state is None or not state.step:
            return
        obj = pl_module.objective_values()  # the activation alone: a fluency term is logged apart
        metrics = {"act/mean": obj.mean(), "act/min": obj.min(), "act/max": obj.max()}
        fluency = pl_module.fluency_values()
        if fluency is not None and bool(torch.isfinite(fluency).any()):
            metrics["fluency/mean"] = fluency.nanmean()
        for t in range(min(self.max_targets, obj.numel())):
            metrics[f"act_target/t{t:04d}"] = obj[t]
        metrics["engine/active_targets"] = (~state.frozen).sum().float()
        pl_module.log("act/mean", metrics.pop("act/mean"), prog_bar=True, on_step=True)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
