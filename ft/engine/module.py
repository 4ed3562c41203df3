"""The LightningModule: a frozen encoder and one trainable input row per target."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from ft.core.cpualloc import keep_freed_memory
from ft.engine.control import ConvergenceControl
from ft.engine.state import FitResult, RowState
from ft.engine.strategy import rank_rows
from ft.inputs import InputParam
from ft.model.arch import adapter
from ft.model.fastforward import FastSiteReader, supports
from ft.model.sites import Site, SiteIndex, SiteReader, hooked_step_flops
from ft.targets.objectives import (
    InputNorm,
    Objective,
    Reading,
    Readouts,
    WordDistance,
    as_readout,
    batch_of,
    top_layer,
)


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
    """`fast`=None: the lean forward (ft.model.fastforward) whenever the model's layers allow it."""
    if fast is None:
        fast = supports(model)
    elif fast and not supports(model):
        from ft.core.errors import ConfigError

        raise ConfigError(f"engine.fast_forward=true, but {type(model).__name__} does not have the standard "
                          "BERT layer structure; valid: auto or false for this model")
    return bool(fast)


def objective(
    model: torch.nn.Module, index: SiteIndex | Readouts, inputs_embeds: torch.Tensor, position: int,
    fast: bool | None = None,
) -> torch.Tensor:
    """Each row's objective at `position`: [rows] (the quantity to maximize).

    `index` (a `Readouts`, or the `SiteIndex` of one: site weights, the mean by default)
    describes exactly the rows of `inputs_embeds`, a `[CLS] ... [SEP]` sequence as
    `full_sequence` builds it. The forward stops after the highest layer read; with the lean
    forward (`fast`, default: when supported) each row also stops at its own highest layer,
    reading there only `position`.
    """
    reading = Reading(model, inputs_embeds[:, 1:-1], inputs_embeds, position, use_fast_forward(model, fast))
    if isinstance(index, Readouts):
        return index.value(reading)
    values = reading.site_values(index)
    return (values * index.weight.to(values.device, values.dtype)).sum(1)


def plan_chunks(rows: Sequence, chunk_size: int, by_layer: bool = True) -> list[slice]:
    """Contiguous chunks of at most `chunk_size` rows (`rows`: objectives or site lists). `by_layer`
    (for the hook-based forward, which stops a whole chunk at once) also cuts where the highest
    needed layer changes, so each chunk stops as early as its rows allow; the lean forward stops
    each row by itself."""
    top = [top_layer(r) for r in rows]
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
    independent and the loss is a sum, never a mean over targets). Each row maximizes its
    objective (a `Readout`: a neuron, a group mean, terms, a direction) plus the regularizers,
    which are objectives too; the module sums them without knowing their kinds. The per-row
    state is one `RowState`; which rows go on is decided by `ConvergenceControl`. Under
    several processes each rank optimizes every world-th row (`ft.engine.strategy.rank_rows`).
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        objectives: Sequence[Objective | Sequence[Site]],
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
        self.control = ConvergenceControl(converge_window, converge_tol, stop_when_converged, freeze_converged)
        self.make_scheduler = scheduler
        self.regularizers = self.build_regularizers(float(reg_norm), float(reg_word), word_vectors)
        self.fast = use_fast_forward(encoder, fast_forward)
        self.all_objectives = [as_readout(o) for o in objectives]
        self.rows = slice(0, len(self.all_objectives))  # the rows this process optimizes
        self._plan_rows()
        if keep not in ("last", "best"):
            raise ValueError(f"keep={keep!r}; valid: last, best")
        self.keep_best = keep == "best"
        self.state = RowState.create(self.num_targets, self.control.window, inputs.param, self.keep_best)
        self.curve_every = max(1, int(curve_every))

    @staticmethod
    def build_regularizers(reg_norm: float, reg_word: float, word_vectors: torch.Tensor | None) -> Objective | None:
        """The regularizers as one objective to add: - reg.norm * |input|^2 - reg.word * distance to words."""
        terms = []
        if reg_norm:  # keep the raw input at word-like magnitudes
            terms.append(-reg_norm * InputNorm())
        if reg_word:  # pull toward the nearest word, in the analysis space of the metrics
            if word_vectors is None:
                raise ValueError("reg_word > 0 needs the analysis-space word vectors")
            terms.append(-reg_word * WordDistance(torch.nn.functional.normalize(word_vectors.float(), dim=-1)))
        return sum(terms) if terms else None

    def _plan_rows(self) -> None:
        mine = self.all_objectives[self.rows]
        self.num_targets = len(mine)
        self.objective_batch = batch_of(self.encoder, mine)  # validates every site
        self._active: tuple[int, list] | None = None  # see active_plan
        self.plan = [(c, batch_of(self.encoder, mine[c]))
                     for c in plan_chunks(mine, self.chunk_size, by_layer=not self.fast)]

    @property
    def index(self) -> SiteIndex:
        """The `SiteIndex` of every row this process optimizes (site objectives)."""
        return self.objective_batch.index

    def configure_callbacks(self) -> list[pl.Callback]:
        """The control, unless the Trainer already holds it (ft.train puts it first, so that it has
        decided a step's rows before any other callback, a checkpoint included, sees the step)."""
        has = self._trainer is not None and any(c is self.control for c in self.trainer.callbacks)
        return [] if has else [self.control]

    # -- the frozen part -------------------------------------------------------------
    @property
    def word_embeddings(self) -> torch.Tensor:
        return adapter(self.encoder).word_embeddings

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        sd = checkpoint["state_dict"]
        for key in [k for k in sd if k.startswith("encoder.")]:
            del sd[key]
        checkpoint["ft_state"] = self.state.to("cpu").state_dict()
        checkpoint["ft_num_targets"] = len(self.all_objectives)
        # the global generators (input=gumbel's noise): a resume continues their streams, as the run would have
        checkpoint["ft_rng"] = {"cpu": torch.get_rng_state(),
                                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from ft.core.errors import ConfigError

        n = checkpoint.get("ft_num_targets")
        if n is not None and n != len(self.all_objectives):
            raise ConfigError(f"checkpoint holds {n} targets, this run has {len(self.all_objectives)}: "
                              "it belongs to another run; use a new run directory")
        if "ft_state" not in checkpoint:
            raise ConfigError("the checkpoint was written by an older ft (no row state); valid: ckpt_path=none "
                              "to start over, or a new run directory")
        self.state = RowState.from_state_dict(checkpoint["ft_state"]).to(self.inputs.param.device)
        rng = checkpoint.get("ft_rng")
        self._pending_rng = rng if isinstance(rng, dict) else None  # set before the first resumed step (the
        # data loader's new iterator draws from the generator after this hook)

    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        rng, self._pending_rng = getattr(self, "_pending_rng", None), None
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
            cuda = rng.get("cuda")
            if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)

    def train(self, mode: bool = True) -> TextualizationModule:
        super().train(mode)
        self.encoder.eval()  # never dropout: the encoder is frozen
        return self

    # -- several processes: each owns a block of rows ----------------------------------
    def setup(self, stage: str) -> None:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if world > 1 and self.rows == slice(0, len(self.all_objectives)):
            self.rows = rank_rows(len(self.all_objectives), rank, world)
            self.inputs.set_rows(self.inputs.param[self.rows])
            self.state = self.state.take(self.rows)
            self._plan_rows()

    def on_fit_start(self) -> None:
        self.state = self.state.to(self.inputs.param.device)
        if self.device.type == "cpu":  # no page faults on the same activations every step
            keep_freed_memory()

    def on_train_end(self) -> None:
        s = self.state
        if s.step and (not s.curve_steps or s.curve_steps[-1] < s.step - 1):
            s.curve_steps.append(s.step - 1)  # curves end at the final step, whatever curve_every is
            s.curves = torch.cat([s.curves, self.objective_values().detach().to(s.curves)[None]])  # the activation
        self.gather_rows()
        if self.keep_best:
            self.restore_best()

    def gather_rows(self) -> None:
        """After a multi-process fit: every rank gets every row back, in target order."""
        if self.rows == slice(0, len(self.all_objectives)) or not dist.is_initialized():
            return
        mine = (self.inputs.param.detach().cpu(), self.state.to("cpu"))
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        device = self.inputs.param.device
        from ft.engine.strategy import interleave

        self.inputs.set_rows(interleave([p[0] for p in parts]).to(device))
        self.state = RowState.interleave([p[1] for p in parts]).to(device)
        self.rows = slice(0, len(self.all_objectives))
        self._plan_rows()

    # -- optimization ----------------------------------------------------------------
    def configure_optimizers(self) -> object:
        opt = self.make_optimizer(self.inputs.parameters())
        if self.make_scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.make_scheduler(opt)}

    def embeds(self, rows: slice = slice(None)) -> torch.Tensor:
        return self.inputs.embeds(self.word_embeddings, rows)

    def reading(self, rows: slice | torch.Tensor) -> Reading:
        e = self.embeds(rows)
        return Reading(self.encoder, e, full_sequence(e, self.word_embeddings, self.cls_id, self.sep_id),
                       self.position, self.fast)

    def chunk_terms(self, rows: slice | torch.Tensor, objective: Readouts) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective [rows], objective + regularizers [rows]): what is reported, what is maximized."""
        reading = self.reading(rows)
        obj = objective(reading)
        total = obj if self.regularizers is None else (objective + self.regularizers)(reading)  # obj is cached
        return obj, total

    def step_flops(self, length: int | None = None, autocast: bool = False) -> float:
        """FLOPs of one optimization step over every chunk, as counted by the reader that runs
        it, plus the input's gradient preconditioning (onehot's exact path) per chunk. `autocast`:
        the step runs under mixed precision (the lean reader's autograd path)."""
        length = length or self.inputs.param.shape[1]
        H = adapter(self.encoder).hidden_size  # + each chunk's backward through the input's gradient hook
        flops = 0.0
        for _, o in self.plan:
            if isinstance(o, Readouts) and self.fast:
                flops += FastSiteReader.step_flops(self.encoder, o.index, length, self.position,
                                                   hand=False if autocast else None)
            elif isinstance(o, Readouts):
                flops += SiteReader.step_flops(self.encoder, o.index, length, self.position)
            else:  # a classifier's whole forward
                flops += hooked_step_flops(self.encoder, len(o), adapter(self.encoder).num_layers - 1, length)
            flops += 2 * self.num_targets * length * H * H
        return flops

    def forward(self) -> torch.Tensor:
        """Objective of the current input for every row of this process: [rows]."""
        return torch.cat([objective(self.reading(rows)) for rows, objective in self.plan])

    def active_plan(self) -> list[tuple[slice | torch.Tensor, Readouts]]:
        """The chunks still to optimize. Frozen (converged or diverged) rows drop out: the plan
        is rebuilt over the active rows once they are at most 90% of the last plan's."""
        frozen = self.state.frozen.cpu()
        n_active = int((~frozen).sum())
        if n_active == self.num_targets:
            return self.plan
        if self._active is None or n_active <= 0.9 * self._active[0]:
            mine = self.all_objectives[self.rows]
            active = (~frozen).nonzero().squeeze(1)
            sub = [mine[i] for i in active.tolist()]
            chunks = plan_chunks(sub, self.chunk_size, by_layer=not self.fast) if sub else []
            plan = [(active[c].to(self.state.frozen.device), batch_of(self.encoder, sub[c])) for c in chunks]
            self._active = (n_active, plan)
        return self._active[1]

    def training_step(self, batch: int, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        state = self.state
        values = state.last.clone()  # frozen rows keep theirs
        for rows, objective in self.active_plan():
            if state.frozen[rows].all():  # converged and frozen: no forward needed
                continue
            obj, total = self.chunk_terms(rows, objective)
            ok = torch.isfinite(obj.detach())  # a diverged row must not poison the others' loss
            self.manual_backward(-torch.where(ok, total, 0).float().sum())  # the only sign flip
            values[rows] = obj.detach().float()
        if self.keep_best:
            self.remember_best(values)
        param = self.inputs.param
        keep = param.detach()[state.frozen].clone() if state.frozen.any() else None
        opt.step()
        if keep is not None:
            with torch.no_grad():
                param[state.frozen] = keep
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        if state.step % self.curve_every == 0:
            state.add_curve(values)
        state.last = values
        state.step += 1  # ConvergenceControl now records the step and decides which rows go on

    def objective_values(self) -> torch.Tensor:
        """[rows] each row's activation objective as of the last step, for `act/*` and the bar (the
        token search's value adds a fluency term, which these leave out)."""
        return self.state.last

    def fluency_values(self) -> torch.Tensor | None:
        """[rows] each row's fluency (nats per token) as of the last step; None without fluency."""
        return None

    def remember_best(self, values: torch.Tensor) -> None:
        """`values` [rows] were measured on the current input (before this step's update)."""
        s = self.state
        better = torch.isfinite(values) & (values > s.best_value)
        if bool(better.any()):
            s.best_value[better] = values[better].to(s.best_value.dtype)
            s.best_param[better] = self.inputs.param.detach()[better].to(s.best_param.dtype)
            s.kept_step[better] = s.step

    @torch.no_grad()
    def restore_best(self) -> None:
        """engine.keep=best: each row's input becomes the best one seen, unless the last input
        (after the final update, never measured during training) is at least as good."""
        s = self.state
        last = self.forward().float()
        better = s.best_value > torch.nan_to_num(last, nan=-math.inf)
        if bool(better.any()):
            param = self.inputs.param.detach().clone()
            param[better] = s.best_param[better].to(param.dtype)
            self.inputs.set_rows(param)
        s.kept_step = torch.where(better, s.kept_step, -1)  # -1: the last input

    def converged(self) -> torch.Tensor:
        """[rows] bool: the control's convergence test on the current state."""
        return self.control.converged(self.state)

    @torch.no_grad()
    def result(self, vocab_ids: torch.Tensor | None = None) -> FitResult:
        """The plain result of the fit for evaluation: each row's input and its objective measured
        afresh in float32 (whatever the precision or reader of the fit), its steps and flags.
        `vocab_ids`: the vocabulary's token ids, over which probabilistic inputs take their argmax."""
        was_training = self.training
        self.eval()  # noise-free readouts (gumbel)
        W = self.word_embeddings.float()
        embeds, obj = [], []
        for rows, objective in self.plan:
            e = self.inputs.embeds(W, rows).float()
            seq = full_sequence(e, W, self.cls_id, self.sep_id)
            with torch.autocast(device_type=seq.device.type, enabled=False):
                obj.append(objective(Reading(self.encoder, e, seq, self.position, self.fast)).float().cpu())
            embeds.append(e.cpu())
        s = self.state.to("cpu")
        steps = s.steps_per_row()
        logits = self.inputs.logits()
        entropy = None
        if self.inputs.probabilistic:
            p = self.inputs.probs().float()
            entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1).cpu()
        extra = {k: v.detach().float().cpu().contiguous()
                 for k, v in self.inputs.extra_tensors(self.word_embeddings).items()}
        ids = self.inputs.discrete_ids(self.word_embeddings)  # input=projected: the tokens it stands for
        self.train(was_training)
        return FitResult(
            embeds=torch.cat(embeds), objectives=torch.cat(obj), steps=steps,
            kept_step=torch.where(s.kept_step >= 0, s.kept_step, steps),
            converged=self.control.converged(s).cpu(), diverged=s.diverged.clone(),
            curve_steps=list(s.curve_steps), curves=s.curves.clone(), total_steps=s.step,
            token_rows=None if logits is None or vocab_ids is None else
            logits.float().cpu()[..., vocab_ids].argmax(dim=-1), entropy=entropy, extra=extra,
            token_ids=None if ids is None else ids.cpu(),
        )

    def train_dataloader(self) -> DataLoader:
        steps = self.trainer.max_steps if self.trainer.max_steps > 0 else 1
        return DataLoader(StepIndices(steps), batch_size=None, shuffle=False)
