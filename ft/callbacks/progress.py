"""One progress bar for a run: step / max steps, targets still moving, mean objective."""

from __future__ import annotations

import sys
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm

from ft.core.bars import refresh_interval


class StepProgress(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimization steps (a run has one epoch of max_steps
    batches; a resumed run starts at its checkpoint's step) instead of batches of an epoch."""

    def __init__(self) -> None:
        super().__init__(refresh_rate=1)
        self._last = 0.0
        self._interval = refresh_interval()

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(desc="textualizing", total=self.trainer.max_steps, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stderr, smoothing=0, unit="step", bar_format=self.BAR_FORMAT)

    def on_train_start(self, *args: Any) -> None:
        super().on_train_start(*args)
        self._last = time.monotonic()  # the bar's first line is written when it is made

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run, made by on_train_start (Lightning's resets it per epoch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        bar, now = self.train_progress_bar, time.monotonic()
        step = steps_done(trainer, pl_module)
        if bar.disable or (now - self._last < self._interval and step < (bar.total or 0)):
            return
        self._last = now
        bar.n = step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.n = steps_done(trainer, pl_module)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, str]:
        state = getattr(pl_module, "state", None)
        if state is None or not state.step:
            return {}
        done = pl_module.converged() | state.diverged
        obj = pl_module.objective_values()  # the activation alone, without a fluency term
        return {"moving": f"{int((~done).sum())}/{obj.numel()}", "act": f"{float(obj.float().nanmean()):.3f}"}


def steps_done(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
    """Optimization steps done: the module's row state, else the trainer's step count."""
    state = getattr(pl_module, "state", None)
    return int(state.step) if state is not None else int(trainer.global_step)
