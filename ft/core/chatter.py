"""What a run prints: ft's own log at `log_level`; W&B's, Lightning's and transformers' chatter
(banners, tips, the W&B history dump, weight-loading bars) only when `log_level=debug`."""

from __future__ import annotations

import logging
import os

THIRD_PARTY = ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")


def configure_output(level: str = "info") -> None:
    """Set ft's log level; quiet third-party output unless `level` is debug."""
    logging.getLogger("ft").setLevel(level.upper())
    verbose = level == "debug"
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        os.environ.setdefault("WANDB_SILENT", "true")  # wandb.init reads it: no banner, no history dump
    import transformers

    if verbose:
        transformers.utils.logging.set_verbosity_info()
        transformers.utils.logging.enable_progress_bar()
    else:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
