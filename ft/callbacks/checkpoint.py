"""Checkpoints that appear whole or not at all, and the callback that turns SIGTERM/SIGINT into a
checkpoint and a clean stop after the step in progress (ft.core.signals holds the handlers)."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from ft.callbacks.progress import steps_done
from ft.core.files import atomic_write
from ft.core.signals import HANDLED, Interrupted, handling


def save_atomically(trainer: pl.Trainer, path: Path, weights_only: bool = False) -> None:
    """trainer.save_checkpoint through `ft.core.files.atomic_write` on rank 0 (the rank that writes):
    a temporary name, flushed and renamed; a failed write names the checkpoint and the cause and
    leaves no temporary file. The other ranks take part in the save without writing."""
    if not trainer.is_global_zero:
        trainer.save_checkpoint(str(path), weights_only)
        return
    atomic_write(path, lambda tmp: trainer.save_checkpoint(str(tmp), weights_only))


class AtomicCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose files appear whole or not at all (temporary file, then rename); a
    failed write names the checkpoint and the cause."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        save_atomically(trainer, Path(filepath), self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)


class StopOnSignal(pl.Callback):
    """Notes SIGTERM/SIGINT; after the step in progress, saves `checkpoint` and raises Interrupted.
    A second Ctrl-C while waiting stops at once (KeyboardInterrupt)."""

    def __init__(self, checkpoint: Path):
        self.checkpoint = Path(checkpoint)
        self.signum: int | None = None

    def note(self, signum: int, _frame: Any) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @contextmanager
    def installed(self):
        """Handlers for the duration of the fit (only the main thread may set them)."""
        with handling(self.note):
            yield self

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning installs its own SIGTERM handler when the fit starts; it would end the run at
        the epoch's end with exit code 0 and no checkpoint. Ours goes back on top of it."""
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in HANDLED:
                signal.signal(s, self.note)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        signum = self.signum
        if trainer.world_size > 1:  # every rank stops at the same step
            signum = int(trainer.strategy.reduce(float(signum or 0), reduce_op="max")) or None
        if signum is None:
            return
        save_atomically(trainer, self.checkpoint)

        raise Interrupted(signum, steps_done(trainer, pl_module), self.checkpoint)
