"""One progress bar for a run: step / max steps, targets still moving, mean objective."""

from __future__ import annotations

import sys
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm

from ft.bars import refresh_interval


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
        step = int(getattr(pl_module, "steps_done", trainer.global_step))
        if bar.disable or (now - self._last < self._interval and step < (bar.total or 0)):
            return
        self._last = now
        bar.n = step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.n = int(getattr(pl_module, "steps_done", trainer.global_step))
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, str]:
        obj = getattr(pl_module, "last_objective", None)
        if obj is None:
            return {}
        done = pl_module.converged() | pl_module.diverged
        return {"moving": f"{int((~done).sum())}/{obj.numel()}", "act": f"{float(obj.float().nanmean()):.3f}"}
