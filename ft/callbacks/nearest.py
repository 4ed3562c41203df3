"""Nearest-words table: the closest vocabulary words of each input, every N steps and at the end."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from ft.engine.module import full_sequence
from ft.measure.metrics import closest_words
from ft.model.arch import adapter


class NearestWords(pl.Callback):
    """Logs a W&B table `nearest/words` (step, target, objective, top-n words with cosines).

    Needs `pl_module.facts` (a `ft.measure.metrics.VocabFacts`); cosines are in the analysis space.
    """

    def __init__(self, every_n_steps: int = 500, top_n: int = 5, max_rows: int = 50):
        self.every_n_steps = every_n_steps
        self.top_n = top_n
        self.max_rows = max_rows

    @torch.no_grad()
    def rows(self, pl_module: pl.LightningModule) -> list[list]:
        n = min(self.max_rows, pl_module.num_targets)
        rows = slice(0, n)
        W = pl_module.word_embeddings
        inputs, was = pl_module.inputs, pl_module.inputs.training
        inputs.eval()  # the noise-free input (gumbel): a report never draws from the run's noise stream
        try:
            embeds = pl_module.embeds(rows).float()
        finally:
            inputs.train(was)
        seq = full_sequence(embeds, W.float(), pl_module.cls_id, pl_module.sep_id)
        analysis = adapter(pl_module.encoder).embed(inputs_embeds=seq)[:, pl_module.position]
        facts = pl_module.facts
        _, top_cos, top_rows = closest_words(analysis.cpu(), facts.word_vectors, self.top_n)
        obj = pl_module.objective_values() if pl_module.state.step else None
        step = pl_module.state.step
        out = []
        for t in range(n):
            words = ", ".join(
                f"{facts.vocab.tokens[int(r)]} ({float(c):.3f})"
                for r, c in zip(top_rows[t], top_cos[t], strict=True)
            )
            out.append([step, t, float(obj[t]) if obj is not None else float("nan"), words])
        return out

    def write_table(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(pl_module, "facts", None) is None:
            return
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not wandb_loggers:
            return
        data = self.rows(pl_module)
        for lg in wandb_loggers:
            lg.log_table("nearest/words", columns=["step", "target", "objective", "closest"],
                         data=data)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: object, batch: object, batch_idx: int) -> None:
        if self.every_n_steps > 0 and pl_module.state.step % self.every_n_steps == 0:
            self.write_table(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write_table(trainer, pl_module)
