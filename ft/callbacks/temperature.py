"""Control callback: anneal the input's temperature (the only state it changes), for inputs that
say they anneal (`inputs.anneals`: input=gumbel)."""

from __future__ import annotations

import warnings

import pytorch_lightning as pl


def annealing(pl_module: pl.LightningModule) -> object | None:
    """The module's input when it anneals, else None (the callback is a no-op then)."""
    inputs = getattr(pl_module, "inputs", None)
    return inputs if getattr(inputs, "anneals", False) else None


class TemperatureSchedule(pl.Callback):
    """Before every step, asks an input that anneals to set its temperature for the step
    (`inputs.anneal(step, total)`; input=gumbel: its geometric tau schedule) and logs it as
    input/tau; a no-op for other parameterizations. Warns when the run ends before the
    temperature reached its end value."""

    def total(self, trainer: pl.Trainer, inputs: object) -> int:
        return int(inputs.anneal_total(trainer.max_steps))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        inputs = annealing(pl_module)
        if inputs is not None and self.total(trainer, inputs) > trainer.max_steps:
            warnings.warn(f"{inputs.name} anneal_steps={self.total(trainer, inputs)} > trainer.max_steps="
                          f"{trainer.max_steps}: tau will not reach {inputs.final_temperature}", stacklevel=2)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: object, batch_idx: int) -> None:
        inputs = annealing(pl_module)
        if inputs is not None:
            tau = inputs.anneal(pl_module.state.step, self.total(trainer, inputs))
            pl_module.log("input/tau", float(tau), on_step=True, on_epoch=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        inputs = annealing(pl_module)
        if inputs is not None and inputs.temperature > inputs.final_temperature * (1 + 1e-6):
            warnings.warn(f"the run ended at tau={inputs.temperature:.4g} before the {inputs.name} schedule "
                          f"reached tau_end={inputs.final_temperature} (stopped early or anneal_steps too long)",
                          stacklevel=2)
