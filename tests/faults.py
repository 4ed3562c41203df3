"""Real faults for tests: a tmpfs mount (small, or read-only) and a callback that fills a disk."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl

from ft.callbacks.progress import steps_done


@contextmanager
def tmpfs(path: Path, size: str = "1m", read_only: bool = False):
    """A real file system at `path`: `size` bytes, optionally read-only (as root, chmod does not
    stop writes; a read-only mount does). Needs root, as CI has."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, f"mounting a tmpfs needs root: {done.stderr.strip()}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> None:
    """Write one file until the file system holding `folder` has no space left."""
    with open(Path(folder) / "filler.bin", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


class FillDisk(pl.Callback):
    """Fills the disk of `folder` when training starts or ends: a disk that becomes full mid-run."""

    def __init__(self, folder: str, when: str = "train_end"):
        self.folder, self.when = Path(folder), when

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "train_start":
            fill(self.folder)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "train_end":
            fill(self.folder)


class SignalSelf(pl.Callback):
    """Sends `signum` to this process when step `at` starts: between one step's end and the next."""

    def __init__(self, at: int = 5, signum: int = 15):
        self.at, self.signum = at, signum

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object,
                             batch_idx: int) -> None:
        import os

        if steps_done(trainer, pl_module) == self.at:
            os.kill(os.getpid(), self.signum)
