"""Control callback: anneal the gumbel-softmax temperature (the only state it changes)."""

from __future__ import annotations

import warnings

import pytorch_lightning as pl

from ft.inputs import GumbelInput


class TemperatureSchedule(pl.Callback):
    """Sets `inputs.tau` before every step from its geometric schedule; a no-op for other
    parameterizations. Warns when the run ends before tau reached its end value."""

    def total(self, trainer: pl.Trainer, inputs: GumbelInput) -> int:
        return int(inputs.anneal_steps or trainer.max_steps)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        inputs = pl_module.inputs
        if isinstance(inputs, GumbelInput) and self.total(trainer, inputs) > trainer.max_steps:
            warnings.warn(f"gumbel anneal_steps={inputs.anneal_steps} > trainer.max_steps="
                          f"{trainer.max_steps}: tau will not reach {inputs.tau_end}", stacklevel=2)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: object, batch_idx: int) -> None:
        inputs = pl_module.inputs
        if isinstance(inputs, GumbelInput):
            inputs.tau.fill_(inputs.tau_at(pl_module.state.step, self.total(trainer, inputs)))
            pl_module.log("input/tau", float(inputs.tau), on_step=True, on_epoch=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        inputs = pl_module.inputs
        if isinstance(inputs, GumbelInput) and float(inputs.tau) > inputs.tau_end * (1 + 1e-6):
            warnings.warn(f"the run ended at tau={float(inputs.tau):.4g} before the gumbel schedule "
                          f"reached tau_end={inputs.tau_end} (stopped early or anneal_steps too long)",
                          stacklevel=2)
