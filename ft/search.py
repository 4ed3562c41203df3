"""`input=tokens`: discrete textualization by gradient-guided token search (GCG's coordinate step).

The input is l real tokens between the frame tokens. Each step, for every active row:
1. the gradient of the objective w.r.t. the one-hot tokens (= grad_e . W_word^T, e = W_word[ids])
   ranks every vocabulary item at every position; the top `topk` per position are proposals;
2. `candidates` single-token swaps (a position, one of its proposals; seeded) are evaluated
   exactly, all rows' candidates in one batch through the same reader as the step;
3. the best swap is kept if it raises the objective.
A row stops when no swap has improved it for `patience` steps (ConvergenceControl with window
`patience`): it is frozen and drops out of the batches. Each target runs as `population` rows
(seeded members; with engine.restarts, restarts x population), and the best member is kept.
No optimizer: the swap step is the update.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ft.errors import ConfigError
from ft.inputs import InputParam
from ft.module import TextualizationModule, full_sequence
from ft.objectives import Reading, batch_of
from ft.state import FitResult

log = logging.getLogger("ft")
MAX_LENGTH = 32


@dataclass(frozen=True)
class SearchSettings:
    topk: int = 256  # proposals per position, by the gradient
    candidates: int = 64  # swaps evaluated per row and step
    population: int = 1  # rows (members) per target
    patience: int = 20  # steps without improvement before a row stops

    def check(self) -> SearchSettings:
        for name in ("topk", "candidates", "population", "patience"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"search.{name}={v!r}; valid: an integer >= 1")
        return self


class TokenInput(InputParam):
    """l token ids per row (the search's state); `embeds` looks them up in W_word."""

    name = "tokens"

    def __init__(self, ids: torch.Tensor, allowed: torch.Tensor):
        super().__init__()
        self.ids = nn.Parameter(ids.clone(), requires_grad=False)  # [rows, l] long
        self.register_buffer("allowed", allowed.clone(), persistent=False)  # [vocab] token ids to propose

    def embeds(self, word_embeddings: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        return word_embeddings[self.ids[rows]]

    def set_rows(self, value: torch.Tensor) -> None:
        self.ids = nn.Parameter(value.detach().clone().long(), requires_grad=False)


def initial_tokens(init_ids: Sequence[int], length: int, allowed: torch.Tensor, seed: int) -> torch.Tensor:
    """[rows, l] random vocabulary items, seeded per row (never corpus text)."""
    out = []
    for tid in init_ids:
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(tid))
        out.append(allowed[torch.randint(len(allowed), (length,), generator=g)])
    return torch.stack(out)


def build_token_input(target_ids: Sequence[int], word_embeddings: torch.Tensor, allowed: torch.Tensor,
                      length: int = 1, seed: int = 0, **_: object) -> TokenInput:
    if not isinstance(length, int) or not 1 <= length <= MAX_LENGTH:
        raise ConfigError(f"input.length={length!r}; valid: 1..{MAX_LENGTH} for input=tokens")
    return TokenInput(initial_tokens(target_ids, length, allowed.cpu(), seed), allowed.cpu())


class TokenSearchModule(TextualizationModule):
    """The engine's module with the swap step in place of the optimizer (same plan, objectives,
    readers, row state, control and devices)."""

    def __init__(self, *args: object, search: SearchSettings = SearchSettings(), seed: int = 0, **kw: object):
        kw.update(converge_window=search.patience, converge_tol=1e-6, freeze_converged=True)
        super().__init__(*args, **kw)
        self.search, self.seed = search.check(), int(seed)
        self._candidate_batches: dict[tuple[int, int], tuple[object, object]] = {}

    def configure_optimizers(self) -> None:
        return None  # the swap step is the update

    def candidate_batch(self, objective: object, rows: slice | torch.Tensor, C: int) -> object:
        """The chunk's objectives, each repeated C times (built once per chunk)."""
        key = (id(objective), C)
        if key not in self._candidate_batches or self._candidate_batches[key][0] is not objective:
            mine = self.all_objectives[self.rows]
            idx = range(len(mine))[rows] if isinstance(rows, slice) else rows.tolist()
            rep = [mine[i] for i in idx for _ in range(C)]
            self._candidate_batches[key] = (objective, batch_of(self.encoder, rep))
        return self._candidate_batches[key][1]

    def token_gains(self, objective: object, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective [r] of the current tokens, [r, l, V] the gradient of the objective w.r.t. the
        one-hot tokens, grad_e . W_word^T: each token's first-order gain)."""
        W = self.word_embeddings
        with torch.enable_grad():
            e = W[ids].detach().requires_grad_(True)
            seq = full_sequence(e, W, self.cls_id, self.sep_id)
            obj = objective(Reading(self.encoder, e, seq, self.position, self.fast))
            grad = torch.autograd.grad(obj.float().sum(), e)[0]  # [r, l, E]
        return obj.detach(), grad.float() @ W.detach().float().T

    def training_step(self, batch: int, batch_idx: int) -> None:
        state, s = self.state, self.search
        W = self.word_embeddings
        values = state.last.clone()
        g = torch.Generator().manual_seed(self.seed * 7_919 + state.step)
        allowed = torch.zeros(W.shape[0], dtype=torch.bool, device=W.device)
        allowed[self.inputs.allowed.to(W.device)] = True
        for rows, objective in self.active_plan():
            if state.frozen[rows].all():
                continue
            ids = self.inputs.ids[rows].clone()  # [r, l]
            r, length = ids.shape
            obj, scores = self.token_gains(objective, ids)  # [r], [r, l, V]
            scores.masked_fill_(~allowed, -torch.inf)
            scores.scatter_(2, ids[..., None], -torch.inf)  # a swap changes the token
            k = min(s.topk, int(allowed.sum()) - 1)
            top = scores.topk(k, dim=-1).indices  # [r, l, k]
            # `candidates` distinct (position, proposal) pairs per row, uniformly (all of them when
            # candidates >= l * topk)
            C = min(s.candidates, length * k)
            pair = torch.rand(r, length * k, generator=g).argsort(dim=1)[:, :C].to(ids.device)
            pos, pick = pair // k, pair % k
            new = top[torch.arange(r, device=ids.device)[:, None], pos, pick]  # [r, C]
            cand = ids[:, None, :].repeat(1, C, 1)
            cand.scatter_(2, pos[..., None], new[..., None])  # [r, C, l]
            flat = cand.reshape(-1, length)
            with torch.no_grad():
                e_c = W[flat]
                seq_c = full_sequence(e_c, W, self.cls_id, self.sep_id)
                vals = self.candidate_batch(objective, rows, C)(Reading(self.encoder, e_c, seq_c, self.position,
                                                                        self.fast)).float().view(r, C)
            best, arg = vals.max(1)
            now = obj.detach().float()
            better = torch.isfinite(best) & (best > now + 1e-6 * now.abs().clamp_min(1e-6))
            better &= ~state.frozen[rows]
            ids[better] = cand[better, arg[better]]
            self.inputs.ids.data[rows] = ids
            values[rows] = torch.where(better, best, now)
        if self.keep_best:
            self.remember_best(values)
        if state.step % self.curve_every == 0:
            state.add_curve(values)
        state.last = values
        state.step += 1

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
        from ft.metrics import measure

        out.objectives = measure(self.encoder, self.all_objectives, framed, self.position)  # through input_ids
        return out
