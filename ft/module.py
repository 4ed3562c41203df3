"""The LightningModule: a frozen encoder and one trainable input row per target."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from ft.arch import adapter
from ft.cpualloc import keep_freed_memory
from ft.fastforward import FastSiteReader, supports
from ft.inputs import InputParam
from ft.sites import Site, SiteIndex, SiteReader
from ft.strategy import interleave, rank_rows


class StepIndices(Dataset):
    """One item per optimization step: the data of a textualization run is the step count."""

    def __init__(self, steps: int):
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> int:
        return i


def full_sequence(
    embeds: torch.Tensor, word_embeddings: torch.Tensor, cls_id: int, sep_id: int
) -> torch.Tensor:
    """[CLS] embeds [SEP] as inputs_embeds: CLS/SEP are fixed one-hot rows of W_word."""
    n = embeds.shape[0]
    cls = word_embeddings[cls_id].to(embeds.dtype).expand(n, 1, -1)
    sep = word_embeddings[sep_id].to(embeds.dtype).expand(n, 1, -1)
    return torch.cat([cls, embeds, sep], dim=1)


def use_fast_forward(model: torch.nn.Module, fast: bool | None = None) -> bool:
    """`fast`=None: the lean forward (ft.fastforward) whenever the model's layers allow it."""
    if fast is None:
        fast = supports(model)
    elif fast and not supports(model):
        from ft.errors import ConfigError

        raise ConfigError(f"engine.fast_forward=true, but {type(model).__name__} does not have the standard "
                          "BERT layer structure; valid: auto or false for this model")
    return bool(fast)


def objective(
    model: torch.nn.Module, index: SiteIndex, inputs_embeds: torch.Tensor, position: int,
    fast: bool | None = None,
) -> torch.Tensor:
    """Mean activation over each row's sites at `position` (the quantity to maximize).

    `index` describes exactly the rows of `inputs_embeds`, a `[CLS] ... [SEP]` sequence as
    `full_sequence` builds it. The forward stops after `index.max_layer`; with the lean
    forward (`fast`, default: when supported) each row also stops at its own highest layer,
    reading there only `position`.
    """
    if use_fast_forward(model, fast):
        reader = FastSiteReader(model, index.points, index.max_layer, position)
        values = reader.read_sites(inputs_embeds, index, const_ends=True)
    else:
        acts = SiteReader(model, index.points, index.max_layer, position).read(inputs_embeds=inputs_embeds)
        flat = index.flatten(acts)
        values = flat.gather(1, index.index.to(flat.device))
    return (values * index.weight.to(values.device, values.dtype)).sum(1)


def plan_chunks(site_lists: Sequence[Sequence[Site]], chunk_size: int, by_layer: bool = True) -> list[slice]:
    """Contiguous chunks of at most `chunk_size` rows. `by_layer` (for the hook-based forward,
    which stops a whole chunk at once) also cuts where the highest needed layer changes, so
    each chunk stops as early as its rows allow; the lean forward stops each row by itself."""
    top = [max(s.layer for s in sites) for sites in site_lists]
    chunks, start = [], 0
    for i in range(1, len(top) + 1):
        if i == len(top) or i - start >= chunk_size or (by_layer and top[i] != top[start]):
            chunks.append(slice(start, i))
            start = i
    return chunks


def rows_for_budget(model: torch.nn.Module, length: int, budget_mb: float, input_row_floats: int = 0) -> int:
    """How many rows fit a chunk: activations kept for backward through every layer, per row,
    ~ S·L·(12·H + 4·I + 2·heads·S) floats (S = l + 2), plus the input row and its gradient.
    Half the budget goes to a chunk; the rest is the model, the vocabulary facts, the inputs."""
    a = adapter(model)
    S, L = length + 2, a.num_layers
    H, inter, heads = a.hidden_size, a.intermediate_size, a.num_heads
    per_row = 4 * (S * L * (12 * H + 4 * inter + 2 * heads * S) + 2 * input_row_floats)
    return max(1, int(budget_mb * 2**20 * 0.5) // per_row)


class TextualizationModule(pl.LightningModule):
    """Activation maximization for many targets at once; each batch row is one target.

    Exactly one trainable tensor: the input parameterization. Optimization is manual so
    that rows can be processed in chunks (gradient accumulation is exact: rows are
    independent and the loss is a sum, never a mean over targets). Under several
    processes each rank optimizes every world-th row (`ft.strategy.rank_rows`).
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        site_lists: Sequence[Sequence[Site]],
        inputs: InputParam,
        optimizer: Callable[..., torch.optim.Optimizer],
        cls_id: int,
        sep_id: int,
        position: int = 1,
        chunk_size: int = 256,
        converge_window: int = 100,
        converge_tol: float = 1e-4,
        stop_when_converged: bool = True,
        freeze_converged: bool = False,
        scheduler: Callable[..., object] | None = None,
        reg_norm: float = 0.0,
        reg_word: float = 0.0,
        word_vectors: torch.Tensor | None = None,
        curve_every: int = 10,
        fast_forward: bool | None = None,
        keep: str = "last",
    ):
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the input, not the frozen encoder
        self.encoder = encoder
        self.inputs = inputs
        self.make_optimizer = optimizer
        self.cls_id, self.sep_id = cls_id, sep_id
        self.position = position
        self.chunk_size = max(1, int(chunk_size))
        self.converge_window = converge_window
        self.converge_tol = converge_tol
        self.stop_when_converged = stop_when_converged
        self.freeze_converged = freeze_converged
        self.make_scheduler = scheduler
        self.reg_norm, self.reg_word = float(reg_norm), float(reg_word)
        if self.reg_word:
            if word_vectors is None:
                raise ValueError("reg_word > 0 needs the analysis-space word vectors")
            unit = torch.nn.functional.normalize(word_vectors.float(), dim=-1)
            self.register_buffer("word_unit", unit, persistent=False)
        self.fast = use_fast_forward(encoder, fast_forward)
        self.all_site_lists = [list(s) for s in site_lists]
        self.rows = slice(0, len(site_lists))  # the rows this process optimizes
        self._plan_rows()
        # Objective history (ring buffer) for the convergence test; saved in checkpoints.
        self.register_buffer("history", torch.full((converge_window + 1, self.num_targets), math.nan))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("frozen", torch.zeros(self.num_targets, dtype=torch.bool))
        self.register_buffer("stopped_at", torch.full((self.num_targets,), -1, dtype=torch.long))
        self.register_buffer("diverged", torch.zeros(self.num_targets, dtype=torch.bool))
        if keep not in ("last", "best"):
            raise ValueError(f"keep={keep!r}; valid: last, best")
        self.keep_best = keep == "best"
        self.register_buffer("kept_step", torch.full((self.num_targets,), -1, dtype=torch.long))
        if self.keep_best:  # the best input seen so far per row, and its objective
            self.register_buffer("best_value", torch.full((self.num_targets,), -math.inf))
            self.register_buffer("best_param", inputs.param.detach().clone())
        self.last_objective: torch.Tensor | None = None
        self.curve_every = max(1, int(curve_every))
        self.curve_steps: list[int] = []  # per-target activation curves, every curve_every steps
        self.curve_values: list[torch.Tensor] = []

    def _plan_rows(self) -> None:
        lists = self.all_site_lists[self.rows]
        self.num_targets = len(lists)
        self.index = SiteIndex(self.encoder, lists)  # validates every site
        self._active: tuple[int, list] | None = None  # see active_plan
        self.plan = [(c, SiteIndex(self.encoder, lists[c]))
                     for c in plan_chunks(lists, self.chunk_size, by_layer=not self.fast)]

    # -- the frozen part -------------------------------------------------------------
    @property
    def word_embeddings(self) -> torch.Tensor:
        return adapter(self.encoder).word_embeddings

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        sd = checkpoint["state_dict"]
        for key in [k for k in sd if k.startswith("encoder.")]:
            del sd[key]
        checkpoint["ft_curves"] = {"steps": list(self.curve_steps), "values": self.curves()}
        checkpoint["ft_num_targets"] = len(self.all_site_lists)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        n = checkpoint.get("ft_num_targets")
        if n is not None and n != len(self.all_site_lists):
            from ft.errors import ConfigError

            raise ConfigError(f"checkpoint holds {n} targets, this run has {len(self.all_site_lists)}: "
                              "it belongs to another run; use a new run directory")
        curves = checkpoint.get("ft_curves")
        if curves:
            self.curve_steps = list(curves["steps"])
            self.curve_values = list(curves["values"])

    def train(self, mode: bool = True) -> TextualizationModule:
        super().train(mode)
        self.encoder.eval()  # never dropout: the encoder is frozen
        return self

    # -- several processes: each owns a block of rows ----------------------------------
    def setup(self, stage: str) -> None:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if world > 1 and self.rows == slice(0, len(self.all_site_lists)):
            self.rows = rank_rows(len(self.all_site_lists), rank, world)
            self.inputs.set_rows(self.inputs.param[self.rows])
            self.history = self.history[:, self.rows].clone()
            self.frozen = self.frozen[self.rows].clone()
            self.stopped_at = self.stopped_at[self.rows].clone()
            self.diverged = self.diverged[self.rows].clone()
            self.kept_step = self.kept_step[self.rows].clone()
            if self.keep_best:
                self.best_value = self.best_value[self.rows].clone()
                self.best_param = self.best_param[self.rows].clone()
            self._plan_rows()

    def on_fit_start(self) -> None:
        if self.device.type == "cpu":  # no page faults on the same activations every step
            keep_freed_memory()

    def on_train_end(self) -> None:
        last = int(self.steps_done) - 1
        if self.last_objective is not None and (not self.curve_steps or self.curve_steps[-1] < last):
            self.curve_steps.append(last)  # curves end at the final step, whatever curve_every is
            self.curve_values.append(self.last_objective.detach().cpu())
        self.gather_rows()
        if self.keep_best:
            self.restore_best()

    def gather_rows(self) -> None:
        """After a multi-process fit: every rank gets every row back, in target order."""
        if self.rows == slice(0, len(self.all_site_lists)) or not dist.is_initialized():
            return
        curves = torch.stack(self.curve_values) if self.curve_values else torch.empty(0, self.num_targets)
        best = (self.best_value.cpu(), self.best_param.cpu()) if self.keep_best else (None, None)
        mine = (self.inputs.param.detach().cpu(), self.history.cpu(), self.frozen.cpu(),
                self.stopped_at.cpu(), curves, self.diverged.cpu(), self.kept_step.cpu(), *best)
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        device = self.inputs.param.device
        self.inputs.set_rows(interleave([p[0] for p in parts]).to(device))
        self.history = interleave([p[1] for p in parts], dim=1).to(device)
        self.frozen = interleave([p[2] for p in parts]).to(device)
        self.stopped_at = interleave([p[3] for p in parts]).to(device)
        self.curve_values = list(interleave([p[4] for p in parts], dim=1))
        self.diverged = interleave([p[5] for p in parts]).to(device)
        self.kept_step = interleave([p[6] for p in parts]).to(device)
        if self.keep_best:
            self.best_value = interleave([p[7] for p in parts]).to(device)
            self.best_param = interleave([p[8] for p in parts]).to(device)
        self.rows = slice(0, len(self.all_site_lists))
        self._plan_rows()

    # -- optimization ----------------------------------------------------------------
    def configure_optimizers(self) -> object:
        opt = self.make_optimizer(self.inputs.parameters())
        if self.make_scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.make_scheduler(opt)}

    def embeds(self, rows: slice = slice(None)) -> torch.Tensor:
        return self.inputs.embeds(self.word_embeddings, rows)

    def chunk_objective(self, rows: slice, index: SiteIndex) -> torch.Tensor:
        return self.chunk_loss_terms(rows, index)[0]

    def chunk_loss_terms(self, rows: slice, index: SiteIndex) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective [rows], regularization penalty: a scalar summed over rows)."""
        e = self.embeds(rows)
        seq = full_sequence(e, self.word_embeddings, self.cls_id, self.sep_id)
        obj = objective(self.encoder, index, seq, self.position, self.fast)
        penalty = obj.new_zeros((), dtype=torch.float32)
        if self.reg_norm:  # keep the raw input at word-like magnitudes
            penalty = penalty + self.reg_norm * e.float().pow(2).sum()
        if self.reg_word:  # pull toward the nearest word, in the analysis space of the metrics
            a = adapter(self.encoder).embed(inputs_embeds=seq)[:, 1:-1].float()
            a = torch.nn.functional.normalize(a, dim=-1)
            penalty = penalty + self.reg_word * (1 - (a @ self.word_unit.T).max(dim=-1).values).sum()
        return obj, penalty

    def step_flops(self, length: int | None = None) -> float:
        """FLOPs of one optimization step over every chunk, as counted by the reader that runs
        it, plus the input's gradient preconditioning (onehot's exact path) per chunk."""
        length = length or self.inputs.param.shape[1]
        reader = FastSiteReader if self.fast else SiteReader
        H = adapter(self.encoder).hidden_size  # + each chunk's backward through the input's gradient hook
        return sum(reader.step_flops(self.encoder, index, length, self.position) + 2 * self.num_targets * length * H * H
                   for _, index in self.plan)

    def forward(self) -> torch.Tensor:
        """Objective of the current input for every row of this process: [rows]."""
        return torch.cat([self.chunk_objective(rows, index) for rows, index in self.plan])

    def active_plan(self) -> list[tuple[slice | torch.Tensor, SiteIndex]]:
        """The chunks still to optimize. Frozen (converged or diverged) rows drop out: the plan
        is rebuilt over the active rows once they are at most 90% of the last plan's."""
        frozen = self.frozen.cpu()
        n_active = int((~frozen).sum())
        if n_active == self.num_targets:
            return self.plan
        if self._active is None or n_active <= 0.9 * self._active[0]:
            lists = self.all_site_lists[self.rows]
            active = (~frozen).nonzero().squeeze(1)
            sub = [lists[i] for i in active.tolist()]
            plan = [(active[c].to(self.frozen.device), SiteIndex(self.encoder, sub[c]))
                    for c in plan_chunks(sub, self.chunk_size, by_layer=not self.fast)] if sub else []
            self._active = (n_active, plan)
        return self._active[1]

    def training_step(self, batch: int, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        step = int(self.steps_done)
        values = self.history[(step - 1) % self.history.shape[0]].clone()  # frozen rows keep theirs
        for rows, index in self.active_plan():
            if self.frozen[rows].all():  # converged and frozen: no forward needed
                continue
            obj, penalty = self.chunk_loss_terms(rows, index)
            ok = torch.isfinite(obj.detach())  # a diverged row must not poison the others' loss
            self.manual_backward(-torch.where(ok, obj, 0).float().sum() + penalty)  # the only sign flip
            values[rows] = obj.detach().float()
        if self.keep_best:
            self.remember_best(values)
        param = self.inputs.param
        keep = param.detach()[self.frozen].clone() if self.frozen.any() else None
        opt.step()
        if keep is not None:
            with torch.no_grad():
                param[self.frozen] = keep
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        self.last_objective = values
        self.record(values)

    def remember_best(self, values: torch.Tensor) -> None:
        """`values` [rows] were measured on the current input (before this step's update)."""
        better = torch.isfinite(values) & (values > self.best_value)
        if bool(better.any()):
            self.best_value[better] = values[better].to(self.best_value.dtype)
            self.best_param[better] = self.inputs.param.detach()[better].to(self.best_param.dtype)
            self.kept_step[better] = int(self.steps_done)

    @torch.no_grad()
    def restore_best(self) -> None:
        """engine.keep=best: each row's input becomes the best one seen, unless the last input
        (after the final update, never measured during training) is at least as good."""
        last = self.forward().float()
        better = self.best_value > torch.nan_to_num(last, nan=-math.inf)
        if bool(better.any()):
            param = self.inputs.param.detach().clone()
            param[better] = self.best_param[better].to(param.dtype)
            self.inputs.set_rows(param)
        self.kept_step = torch.where(better, self.kept_step, -1)  # -1: the last input

    def record(self, values: torch.Tensor) -> None:
        """Keep the objective history; stop the run when every target has converged."""
        step = int(self.steps_done)
        self.history[step % self.history.shape[0]] = values
        if step % self.curve_every == 0:
            self.curve_steps.append(step)
            self.curve_values.append(values.detach().cpu())
        self.steps_done += 1
        bad = ~torch.isfinite(values) & ~self.diverged
        if bad.any():  # NaN/inf (lr too high, overflow): mark, freeze, go on with the others
            self.diverged |= bad
            self.frozen |= bad
            self.stopped_at[bad] = int(self.steps_done)
            rank_zero_warn(f"{int(bad.sum())} target(s) diverged (non-finite objective) at step "
                           f"{int(self.steps_done)}; they are frozen and reported as diverged")
            if bool(self.diverged.all()):
                self.trainer.should_stop = True
        converged = self.converged() | self.diverged
        if self.freeze_converged:
            newly = converged & ~self.frozen
            self.stopped_at[newly] = int(self.steps_done)
            self.frozen |= newly
        if self.stop_when_converged:
            done = bool(converged.all())
            if self.trainer.world_size > 1:
                done = self.trainer.strategy.reduce_boolean_decision(done, all=True)
            if done:
                self.trainer.should_stop = True

    def converged(self) -> torch.Tensor:
        """Per target: relative change over the last `converge_window` steps <= tol."""
        step = int(self.steps_done)
        if step <= self.converge_window:
            return torch.zeros(self.num_targets, dtype=torch.bool, device=self.history.device)
        n = self.history.shape[0]
        now = self.history[(step - 1) % n]
        before = self.history[step % n]  # the oldest entry: converge_window steps earlier
        return (now - before).abs() <= self.converge_tol * now.abs().clamp_min(1e-8)

    def curves(self) -> torch.Tensor:
        """[samples, targets] objective every `curve_every` steps (steps in `curve_steps`)."""
        if not self.curve_values:
            return torch.empty(0, self.num_targets)
        return torch.stack(self.curve_values)

    def steps_per_target(self) -> torch.Tensor:
        """Steps each target was optimized for (frozen targets stopped earlier)."""
        steps = torch.full_like(self.stopped_at, int(self.steps_done))
        return torch.where(self.stopped_at >= 0, self.stopped_at, steps)

    def train_dataloader(self) -> DataLoader:
        steps = self.trainer.max_steps if self.trainer.max_steps > 0 else 1
        return DataLoader(StepIndices(steps), batch_size=None, shuffle=False)
