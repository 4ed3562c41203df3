"""`input=tokens`: discrete textualization by gradient-guided token search (GCG's coordinate step,
with a memory of where the walk has been).

The input is l real tokens between the frame tokens. Each step, for every active row:
1. the gradient of the objective w.r.t. the one-hot tokens (= grad_e . W_word^T, e = W_word[ids])
   ranks every vocabulary item at every position; the top `topk` per position are proposals;
2. `candidates` single-token swaps (a position, one of its proposals; seeded) are evaluated
   exactly, all rows' candidates in one batch through the same reader as the step;
3. the row moves to the best candidate it has not visited, as GCG does, even when that is worse
   than where it stands: a local optimum of single swaps is left instead of ending the walk. The
   last `memory` sequences (hashes) are not visited again, so the walk does not cycle back
   (tabu search). The best sequence seen is the row's result.
The objective the run reports and the convergence control reads is the best seen so far: a row
stops when that has not improved for `patience` steps (ConvergenceControl with window
`patience`), is frozen and drops out of the batches. Each target runs as `population` rows
(seeded members; with engine.restarts, restarts x population), and the best member is kept.
No optimizer: the swap step is the update.

On the packaged MiniLM at l = 1, stopping at the first local optimum (moving only on an
improving swap) reaches the most activating word on about a third of the default targets; the
walk reaches it on nearly all (README, "input=tokens").

The token input itself (`TokenInput`, `build_token_input`, `initial_tokens`, `MAX_LENGTH`) is
ft.inputs.tokens; its names stay importable from here, since configs/input/tokens.yaml and older run
directories name `ft.engine.search.build_token_input` (or `ft.search.build_token_input`) as `_target_`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ft.core.errors import ConfigError
from ft.engine.module import TextualizationModule, full_sequence
from ft.engine.state import FitResult, RowState
from ft.inputs import MAX_LENGTH, TokenInput, build_token_input, initial_tokens  # noqa: F401
from ft.targets.objectives import Reading, batch_of

log = logging.getLogger("ft")


@dataclass(frozen=True)
class SearchSettings:
    topk: int = 256  # proposals per position, by the gradient
    candidates: int = 256  # swaps evaluated per row and step
    population: int = 1  # rows (members) per target
    patience: int = 40  # steps without a better sequence before a row stops

    @property
    def memory(self) -> int:
        """Sequences the walk remembers (and does not revisit): longer than any walk between two
        improvements, which is at most `patience` steps."""
        return 2 * self.patience + 1

    def check(self) -> SearchSettings:
        for name in ("topk", "candidates", "population", "patience"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"search.{name}={v!r}; valid: an integer >= 1")
        return self


_P1, _P2 = 2_147_483_647, 2_147_483_629  # primes < 2^31: two rolling hashes, one int64 (< 2^62)


def sequence_hash(ids: torch.Tensor) -> torch.Tensor:
    """[..., l] long -> [...] long >= 0: a hash of each token sequence (exact arithmetic in int64:
    every intermediate stays below 2^52)."""
    h1 = torch.zeros(ids.shape[:-1], dtype=torch.long, device=ids.device)
    h2 = torch.zeros_like(h1)
    for i in range(ids.shape[-1]):
        t = ids[..., i] + 1
        h1 = (h1 * 1_000_003 + t) % _P1
        h2 = (h2 * 999_983 + t) % _P2
    return h1 * _P2 + h2


def row_noise(rows: torch.Tensor, n: int, step: int, seed: int) -> torch.Tensor:
    """[r, n] pseudo-random int64 >= 0 that depend only on (seed, step, row, column): each target
    row draws the same candidates however the rows are chunked or split across processes
    (engine.chunk_size, trainer.devices). A counter-based hash with exact int64 arithmetic
    (xor-shift and multiply modulo a prime below 2^31)."""
    col = torch.arange(n, device=rows.device)
    x = (rows[:, None] * 1_000_003 + col * 7_919 + (step * 104_729 + seed * 15_485_863) % _P1) % _P1
    for m in (1_103_515_245, 2_654_435_761 % _P1, 362_436_069):
        x = ((x ^ (x >> 15)) * m) % _P1
    return x


class SwapStep(torch.optim.Optimizer):
    """The swap step as the run's optimizer: `step` writes the tokens each row moves to (handed
    over by the module's training step through `propose`) into the ids. Being an optimizer,
    its steps are what Lightning counts (trainer.max_steps, checkpoint intervals, resume)."""

    def __init__(self, ids: nn.Parameter):
        super().__init__([ids], {})
        self.pending: list[tuple[slice | torch.Tensor, torch.Tensor]] = []

    def propose(self, rows: slice | torch.Tensor, ids: torch.Tensor) -> None:
        self.pending.append((rows, ids))

    @torch.no_grad()
    def step(self, closure: object = None) -> None:
        [param] = self.param_groups[0]["params"]
        for rows, ids in self.pending:
            param[rows] = ids.to(param)
        self.pending.clear()


class TokenSearchModule(TextualizationModule):
    """The engine's module with the swap step in place of the optimizer (same plan, objectives,
    readers, row state, control and devices)."""

    def __init__(self, *args: object, search: SearchSettings = SearchSettings(), seed: int = 0,
                 fluency: object = None, row_weights: Sequence[float] | None = None, **kw: object):
        """`fluency` (ft.measure.fluency) and `row_weights` [all rows]: each row maximizes its objective
        + weight x the fluency of its text (weights 0: the objective alone)."""
        # the walk passes through worse sequences: the result is always the best one seen
        kw.update(converge_window=search.patience, converge_tol=1e-6, freeze_converged=True, keep="best")
        super().__init__(*args, **kw)
        self.search, self.seed = search.check(), int(seed)
        self.fluency = fluency
        weights = (torch.zeros(len(self.all_objectives)) if row_weights is None
                   else torch.tensor(row_weights, dtype=torch.float64))
        if weights.shape != (len(self.all_objectives),):
            raise ValueError(f"row_weights: {tuple(weights.shape)}, rows: {len(self.all_objectives)}")
        if fluency is None and bool((weights != 0).any()):
            raise ValueError("a fluency weight > 0 needs a fluency model")
        self.register_buffer("row_weights", weights.float(), persistent=False)  # [all rows]
        self.weights_as_given = weights.double()  # reported as configured, not rounded to float32
        self.state = RowState.create(self.num_targets, self.control.window, self.inputs.param, True, search.memory)
        self._candidate_batches: dict[tuple[int, int], tuple[object, object]] = {}
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None  # see kept_terms


    def configure_optimizers(self) -> SwapStep:
        return SwapStep(self.inputs.ids)  # the swap step is the update; optim.* is unused

    def candidate_batch(self, objective: object, rows: slice | torch.Tensor, C: int) -> object:
        """The chunk's objectives, each repeated C times (built once per chunk)."""
        key = (id(objective), C)
        if key not in self._candidate_batches or self._candidate_batches[key][0] is not objective:
            mine = self.all_objectives[self.rows]
            idx = range(len(mine))[rows] if isinstance(rows, slice) else rows.tolist()
            rep = [mine[i] for i in idx for _ in range(C)]
            self._candidate_batches[key] = (objective, batch_of(self.encoder, rep))
        return self._candidate_batches[key][1]

    def token_gains(self, objective: object, ids: torch.Tensor, weights: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(objective [r] of the current tokens, [r, l, V] each swap's estimated gain of the value,
        fluency [r] of the current tokens or None).

        The objective's gain is first-order: its gradient w.r.t. the one-hot tokens,
        grad_e . W_word^T. With fluency `weights` [r] (any > 0), the value is objective + weight x
        fluency and the gain adds weight x the fluency's own change for that swap (ft.measure.fluency)."""
        W = self.word_embeddings
        with torch.enable_grad():
            e = W[ids].detach().requires_grad_(True)
            seq = full_sequence(e, W, self.cls_id, self.sep_id)
            obj = objective(Reading(self.encoder, e, seq, self.position, self.fast))
            grad = torch.autograd.grad(obj.float().sum(), e)[0]  # [r, l, E]
        value, gains, flu = obj.detach().float(), grad.float() @ W.detach().float().T, None
        if weights is not None and bool((weights > 0).any()):
            flu = self.fluency.score(ids).float()
            gains = gains + weights[:, None, None] * self.fluency.swap_gains(ids).float()
        return value, gains, flu

    def chunk_weights(self, target_row: torch.Tensor) -> torch.Tensor | None:
        """[r] the chunk's fluency weights, None when all are 0."""
        w = self.row_weights[target_row]
        return w if bool((w > 0).any()) else None

    def training_step(self, batch: int, batch_idx: int) -> None:
        state, s = self.state, self.search
        W = self.word_embeddings
        if state.visited is None:  # a checkpoint from before the walk had a memory
            state.visited = torch.full((s.memory, state.rows), -1, dtype=torch.long, device=W.device)
        allowed = torch.zeros(W.shape[0], dtype=torch.bool, device=W.device)
        allowed[self.inputs.allowed.to(W.device)] = True
        opt = self.optimizers()
        slot = (state.step + 1) % s.memory  # this step's entry in each row's memory (slot 0: the start)
        target_row = torch.arange(len(self.all_objectives), device=W.device)[self.rows]  # this rank's rows
        for rows, objective in self.active_plan():
            if state.frozen[rows].all():
                continue
            ids = self.inputs.ids[rows].clone()  # [r, l]
            r, length = ids.shape
            ar = torch.arange(r, device=ids.device)
            weights = self.chunk_weights(target_row[rows])  # [r] or None
            pure, scores, flu = self.token_gains(objective, ids, weights)  # [r], [r, l, V], [r] or None
            obj = pure if flu is None else pure + weights * flu
            self.remember(rows, ids, obj.float(), pure, flu)  # the first step's random start, or a resumed walk
            scores.masked_fill_(~allowed, -torch.inf)
            scores.scatter_(2, ids[..., None], -torch.inf)  # a swap changes the token
            k = min(s.topk, int(allowed.sum()) - 1)
            top = scores.topk(k, dim=-1).indices  # [r, l, k]
            # `candidates` distinct (position, proposal) pairs per row, uniformly (all of them when
            # candidates >= l * topk)
            C = min(s.candidates, length * k)
            noise = row_noise(target_row[rows], length * k, state.step, self.seed)
            pair = noise.argsort(dim=1)[:, :C]
            pos, pick = pair // k, pair % k
            new = top[ar[:, None], pos, pick]  # [r, C]
            cand = ids[:, None, :].repeat(1, C, 1)
            cand.scatter_(2, pos[..., None], new[..., None])  # [r, C, l]
            flat = cand.reshape(-1, length)
            with torch.no_grad():
                e_c = W[flat]
                seq_c = full_sequence(e_c, W, self.cls_id, self.sep_id)
                pure_c = self.candidate_batch(objective, rows, C)(Reading(self.encoder, e_c, seq_c, self.position,
                                                                          self.fast)).float().view(r, C)
                flu_c = self.fluency.score(flat).float().view(r, C) if weights is not None else None
                vals = pure_c if flu_c is None else pure_c + weights[:, None] * flu_c
            memory = state.visited[:, rows].T  # [r, memory]
            seen = (sequence_hash(cand)[..., None] == memory[:, None, :]).any(-1)  # [r, C]
            vals = vals.masked_fill(seen | ~torch.isfinite(vals), -torch.inf)
            best, arg = vals.max(1)
            move = torch.isfinite(best) & ~state.frozen[rows]  # nowhere new to go: stay
            ids[move] = cand[move, arg[move]]
            opt.optimizer.propose(rows, ids)
            self.remember(rows, ids, torch.where(move, best, obj.float()), torch.where(move, pure_c[ar, arg], pure),
                          None if flu is None else torch.where(move, flu_c[ar, arg], flu))
            hashes = state.visited[slot, rows]
            state.visited[slot, rows] = torch.where(move, sequence_hash(ids), hashes)
        opt.step()
        values = torch.where(torch.isfinite(state.best_value), state.best_value, state.last)
        if state.step % self.curve_every == 0:  # the activation curve: without the fluency term
            state.add_curve(self.kept_terms()[0].to(values) if self.uses_fluency() else values)
        state.last = values
        state.step += 1

    def kept_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective [rows], fluency [rows]) of each row's kept sequence, measured once (a resumed
        walk, whose checkpoint holds the sequences) and then updated with every new best."""
        if self._kept is None:
            seen = torch.isfinite(self.state.best_value.cpu())
            pure, flu = torch.full(seen.shape, -torch.inf), torch.full(seen.shape, torch.nan)
            if bool(seen.any()):  # a resumed walk
                ids = self.state.best_param.long().to(self.inputs.ids.device)
                framed = torch.cat([torch.full((len(ids), 1), self.cls_id, device=ids.device), ids,
                                    torch.full((len(ids), 1), self.sep_id, device=ids.device)], 1)
                from ft.engine.evaluate import measure

                mine = self.all_objectives[self.rows]
                pure = torch.where(seen, measure(self.encoder, mine, framed, self.position).float().cpu(), pure)
                flu = torch.where(seen, self.fluency.score(ids).float().cpu(), flu)
            self._kept = (pure, flu)
        return self._kept

    def objective_values(self) -> torch.Tensor:
        """[rows] the activation objective of each row's kept sequence, without the fluency term
        the walk's value adds (act/* and the bar; `fluency_values` has the other term)."""
        return self.kept_terms()[0] if self.uses_fluency() else self.state.last

    def fluency_values(self) -> torch.Tensor | None:
        return self.kept_terms()[1] if self.uses_fluency() else None

    def uses_fluency(self) -> bool:
        """Some row's value adds a fluency term (a weight > 0)."""
        return self.fluency is not None and bool((self.row_weights > 0).any())

    @torch.no_grad()
    def restore_best(self) -> None:
        """Each row's result is the best sequence it saw (every position it moved to was
        remembered with its value, fluency included, so the last one is never better)."""
        self.inputs.set_rows(self.state.best_param.to(self.inputs.ids.device))

    def remember(self, rows: slice | torch.Tensor, ids: torch.Tensor, values: torch.Tensor,
                 pure: torch.Tensor | None = None, flu: torch.Tensor | None = None) -> None:
        """Rows of `rows` now at `ids` [r, l] with value `values` [r] (the objective `pure` plus
        weight x fluency `flu`): keep any new best, and put the sequence in the row's memory (once
        per step, the slot of this step)."""
        s = self.state
        track = pure is not None and self.uses_fluency()
        if track:
            self.kept_terms()  # measured before the first change
        idx = torch.arange(s.rows, device=ids.device)[rows]
        better = torch.isfinite(values) & (values > s.best_value[idx] + 1e-6 * values.abs().clamp_min(1e-6))
        better &= ~s.frozen[idx]
        if bool(better.any()):
            s.best_value[idx[better]] = values[better].to(s.best_value.dtype)
            s.best_param[idx[better]] = ids[better].to(s.best_param.dtype)
            s.kept_step[idx[better]] = s.step
            if track:
                kept_pure, kept_flu = self._kept
                at = idx[better].cpu()
                kept_pure[at] = pure[better].float().cpu()
                kept_flu[at] = flu[better].float().cpu() if flu is not None else torch.nan
        if s.step == 0:  # the start is visited
            s.visited[0, idx] = sequence_hash(ids)

    @torch.no_grad()
    def result(self, vocab_ids: torch.Tensor | None = None) -> FitResult:
        """As for the other inputs, with each row's tokens; the objective is measured on exactly
        those ids by a fresh fp32 forward with `input_ids` (the model's own embedding lookup)."""
        out = super().result(vocab_ids)
        ids = self.inputs.ids.detach().cpu()
        out.token_ids = ids
        if vocab_ids is not None:
            row_of = torch.full((int(max(vocab_ids.max(), ids.max())) + 1,), -1, dtype=torch.long)
            row_of[vocab_ids.cpu()] = torch.arange(len(vocab_ids))
            out.token_rows = row_of[ids]
        framed = torch.cat([torch.full((len(ids), 1), self.cls_id), ids, torch.full((len(ids), 1), self.sep_id)], 1)
        from ft.engine.evaluate import measure

        out.objectives = measure(self.encoder, self.all_objectives, framed, self.position)  # through input_ids
        if self.fluency is not None:
            out.fluency = self.fluency.score(ids.to(self.row_weights.device)).float().cpu()
            out.fluency_weight = self.weights_as_given.clone()
            out.fluency_source = self.fluency.name
        return out
