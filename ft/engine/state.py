"""The engine's state in one place: `RowState` (what each row carries through a fit) and
`FitResult` (what a finished fit hands to evaluation).

A new per-row field is one declaration in `RowState`: `per_row(dim)` says which dimension holds
the rows; `take` (a rank's rows), `interleave` (the ranks' rows back in target order), `to`
(a device) and `state_dict` / `from_state_dict` (checkpoints) all follow from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import pytorch_lightning as pl
import torch

from ft.engine.strategy import interleave


def per_row(dim: int = 0, default=None):
    """A field with one entry per row along `dim` (None when a run does not use it)."""
    return field(default=default, metadata={"row_dim": dim})


def shared(default_factory):
    """A field of the whole run, the same for every row (steps done, the curve's steps)."""
    return field(default_factory=default_factory, metadata={"row_dim": None})


@dataclass
class RowState:
    history: torch.Tensor = per_row(1)  # [window + 1, rows] objective ring buffer (convergence)
    last: torch.Tensor = per_row()  # [rows] the last measured objective (NaN before the first step)
    frozen: torch.Tensor = per_row()  # [rows] bool: no longer optimized
    diverged: torch.Tensor = per_row()  # [rows] bool: a non-finite objective was seen
    stopped_at: torch.Tensor = per_row()  # [rows] long: the step a frozen row stopped at, -1
    kept_step: torch.Tensor = per_row()  # [rows] long: engine.keep=best's step, -1 = the last input
    best_value: torch.Tensor | None = per_row()  # [rows] engine.keep=best: best objective seen
    best_param: torch.Tensor | None = per_row()  # [rows, ...] engine.keep=best: its input
    curves: torch.Tensor = per_row(1)  # [samples, rows] the objective every curve_every steps
    visited: torch.Tensor | None = per_row(1)  # [memory, rows] input=tokens: hashes of the walk's
    # last `memory` sequences (-1 = empty), which it does not move back to
    step: int = shared(int)  # optimization steps done
    curve_steps: list[int] = shared(list)  # the step of each curve sample

    @classmethod
    def create(cls, rows: int, window: int, param: torch.Tensor | None = None, keep_best: bool = False,
               memory: int = 0) -> RowState:
        """`memory` > 0: a walk's memory of that many sequences per row (input=tokens)."""
        return cls(
            history=torch.full((window + 1, rows), math.nan), last=torch.full((rows,), math.nan),
            frozen=torch.zeros(rows, dtype=torch.bool), diverged=torch.zeros(rows, dtype=torch.bool),
            stopped_at=torch.full((rows,), -1, dtype=torch.long), kept_step=torch.full((rows,), -1, dtype=torch.long),
            best_value=torch.full((rows,), -math.inf) if keep_best else None,
            best_param=param.detach().clone() if keep_best else None,
            curves=torch.empty(0, rows),
            visited=torch.full((memory, rows), -1, dtype=torch.long) if memory else None,
        )

    @classmethod
    def row_fields(cls) -> list[tuple[str, int]]:
        return [(f.name, f.metadata["row_dim"]) for f in fields(cls) if f.metadata["row_dim"] is not None]

    @property
    def rows(self) -> int:
        return self.last.shape[0]

    def take(self, rows: slice | torch.Tensor) -> RowState:
        """The state of `rows` only (a rank's share)."""
        out = {}
        for name, dim in self.row_fields():
            v = getattr(self, name)
            out[name] = None if v is None else v[(slice(None),) * dim + (rows,)].clone()
        return replace(self, **out, curve_steps=list(self.curve_steps))

    @classmethod
    def interleave(cls, parts: list[RowState]) -> RowState:
        """Rank r's rows are r, r + world, ... (`ft.engine.strategy.rank_rows`): all rows, in order."""
        out = {}
        for name, dim in cls.row_fields():
            vs = [getattr(p, name) for p in parts]
            out[name] = None if vs[0] is None else interleave([v.cpu() for v in vs], dim=dim)
        return replace(parts[0], **out, curve_steps=list(parts[0].curve_steps))

    def to(self, device: torch.device | str) -> RowState:
        return replace(self, **{n: None if getattr(self, n) is None else getattr(self, n).to(device)
                                for n, _ in self.row_fields()})

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict) -> RowState:
        names = {f.name for f in fields(cls)}
        optional = {f.name for f in fields(cls) if f.default is None}  # newer fields: older checkpoints lack them
        missing = names - set(state) - optional
        if missing:
            raise KeyError(f"row state lacks {sorted(missing)}")
        return cls(**{k: state[k] for k in names if k in state})

    # -- what the step records --------------------------------------------------------------
    def add_curve(self, values: torch.Tensor) -> None:
        self.curve_steps.append(self.step)
        self.curves = torch.cat([self.curves, values.detach().to(self.curves.device, self.curves.dtype)[None]])

    def steps_per_row(self) -> torch.Tensor:
        """Steps each row was optimized for (frozen rows stopped earlier)."""
        return torch.where(self.stopped_at >= 0, self.stopped_at, torch.full_like(self.stopped_at, self.step))


@dataclass
class FitResult:
    """What a finished fit hands to evaluation: plain tensors (CPU, float32), no module.

    Every row is a target row of the run, in target order (all ranks gathered)."""

    embeds: torch.Tensor  # [rows, l, E] the optimized input as `inputs_embeds` takes it
    objectives: torch.Tensor  # [rows] each row's objective, by a fresh fp32 forward of `embeds`
    steps: torch.Tensor  # [rows] long: steps optimized
    kept_step: torch.Tensor  # [rows] long: the step whose input was kept (engine.keep)
    converged: torch.Tensor  # [rows] bool
    diverged: torch.Tensor  # [rows] bool
    curve_steps: list[int]  # the steps of the curve samples
    curves: torch.Tensor  # [samples, rows]
    total_steps: int  # steps the run took
    token_ids: torch.Tensor | None = None  # [rows, l] input=tokens: the searched token ids
    token_rows: torch.Tensor | None = None  # [rows, l] probabilistic inputs: each token's argmax (vocabulary row)
    entropy: torch.Tensor | None = None  # [rows] probabilistic inputs: mean entropy (nats)
    fluency: torch.Tensor | None = None  # [rows] input=tokens: each row's text's fluency (nats/token)
    fluency_weight: torch.Tensor | None = None  # [rows] input=tokens: the weight its search gave fluency
    fluency_source: str | None = None  # which fluency: `bigram:CORPUS` or `mlm-pll:MODEL`
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # the input's own tensors to save


class CheckpointRecord(pl.Callback):
    """What made a checkpoint, stored inside it under `ft`: the run's resolved settings (flat dotted
    keys), the fingerprints of its input files and one line naming it. A checkpoint passed
    anywhere (`ckpt_path=FILE`, outside its run directory) is checked against this record."""

    KEY = "ft"

    def __init__(self, settings: dict[str, object], inputs: dict[str, dict], made_by: str):
        self.record = {"settings": settings, "inputs": inputs, "made_by": made_by}

    def on_save_checkpoint(self, trainer: object, pl_module: object, checkpoint: dict) -> None:
        checkpoint[self.KEY] = self.record


class FitEnded(pl.Callback):
    """Notes that the fit's end ran. A fit resumed from a checkpoint with no steps left skips the
    whole loop, its end included (Lightning's `fit_loop.skip`); the run then finishes the
    module's state itself (`on_train_end`: the final curve sample, the kept inputs), exactly as
    the interrupted fit would have: checkpoints are saved at a step's end, never after it."""

    def __init__(self) -> None:
        self.ended = False

    def on_train_end(self, trainer: object, pl_module: object) -> None:
        self.ended = True
