"""Every target's objective over every single word of the vocabulary: from a vocabulary sweep
(`word_stats`, chunked to a memory budget) or streamed when the table does not fit
(`stream_word_stats`), and for class logits through the classifier (`logit_word_stats`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ft.core.bars import bar
from ft.model.encoder import Encoder
from ft.model.sites import Site, SiteIndex, num_layers
from ft.model.vocab import Vocabulary, stream_vocabulary
from ft.targets.objectives import Readout, Readouts


def weight_matrix(index: SiteIndex, rows: slice, features: int) -> torch.Tensor:
    """[features, rows] the rows' site weights as dense columns (for wide objectives: directions)."""
    idx, w, valid = index.index[rows], index.weight[rows], index.valid[rows]
    cols = torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)
    M = torch.zeros(features, idx.shape[0])
    M.index_put_((idx[valid], cols[valid]), w[valid], accumulate=True)
    return M


def readout_values(flat: torch.Tensor, batch: Readouts, rows: slice) -> torch.Tensor:
    """[batch, rows]: the objectives of `rows` for activations `flat` [batch, features]. Sparse
    linear objectives (neurons, groups) gather their sites; wide ones (a direction, an SAE latent
    reads a whole point) multiply by their dense weights, cheaper than gathering every unit;
    objectives with norms (heads) gather their slots and combine them."""
    index = batch.index
    if batch.groups is not None:
        return batch.combine(flat[:, index.index[rows]], rows)
    if index.index.shape[1] * 8 >= flat.shape[1]:
        out = flat @ weight_matrix(index, rows, flat.shape[1]).to(flat.dtype)
    else:
        out = (flat[:, index.index[rows]] * index.weight[rows]).sum(-1)
    return out + batch.bias[rows] if batch.has_bias else out


def objective_chunks(
    sweeps: dict[str, torch.Tensor], model: torch.nn.Module, objectives: Sequence[Readout | Sequence[Site]],
    budget_bytes: int = 2**27,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first target, [V', chunk]): each target's objective for every single word, a chunk of
    targets at a time so the [V', chunk, sites] gather fits `budget_bytes`."""
    batch = Readouts(model, objectives, max_layer=num_layers(model) - 1)
    index = batch.index
    if len(index.points) == 1:  # a view of the sweep, not a copy
        flat = sweeps[index.points[0]].flatten(1)
    else:
        flat = index.flatten({p: sweeps[p] for p in index.points})
    k = index.index.shape[1]
    dense = k * 8 >= flat.shape[1] and batch.groups is None
    per_target = flat.shape[0] * (1 if dense else k)  # floats a target's column costs
    step = max(1, budget_bytes // (4 * per_target))
    for start in range(0, len(objectives), step):
        yield start, readout_values(flat, batch, slice(start, start + step))


def vocab_objective(
    sweeps: dict[str, torch.Tensor], model: torch.nn.Module, objectives: Sequence[Readout | Sequence[Site]],
    budget_bytes: int = 2**27,
) -> torch.Tensor:
    """[V', targets]: the whole matrix (small models and tests; runs use `word_stats`)."""
    return torch.cat([obj for _, obj in objective_chunks(sweeps, model, objectives, budget_bytes)], dim=1)


@dataclass
class WordStats:
    """Per target, over every single word: the best word and the target word's value."""

    max_activation: torch.Tensor  # [targets]
    max_row: torch.Tensor  # [targets] row in the Vocabulary
    at_target_word: torch.Tensor  # [targets]; NaN where a target has no target word


def word_stats(
    sweeps: dict[str, torch.Tensor], model: torch.nn.Module, objectives: Sequence[Readout | Sequence[Site]],
    target_rows: Sequence[int | None], budget_bytes: int = 2**27,
) -> WordStats:
    """`vocab_objective` reduced target chunk by target chunk: memory stays at `budget_bytes`
    however many targets (the full [V', targets] matrix is 1.1 GB for bert-base's 9,216 neurons)."""
    best, rows, at_word = [], [], []
    for start, obj in objective_chunks(sweeps, model, objectives, budget_bytes):
        value, row = obj.max(dim=0)
        best.append(value)
        rows.append(row)
        for j, w in enumerate(target_rows[start : start + obj.shape[1]]):
            at_word.append(float("nan") if w is None else float(obj[w, j]))
    return WordStats(torch.cat(best), torch.cat(rows), torch.tensor(at_word))


def stream_word_stats(encoder: Encoder, vocab: Vocabulary, objectives: Sequence[Readout | Sequence[Site]],
                      target_rows: Sequence[int | None], position: int = 1, batch_size: int = 1024) -> WordStats:
    """`word_stats` in one pass over the vocabulary: each batch's objectives are reduced at once."""
    model = encoder.model
    n = len(objectives)
    batch = Readouts(model, objectives, max_layer=num_layers(model) - 1)
    index = batch.index
    best = torch.full((n,), -torch.inf)
    best_row = torch.zeros(n, dtype=torch.long)
    at_word = torch.full((n,), torch.nan)
    by_row: dict[int, list[int]] = {}
    for t, r in enumerate(target_rows):
        if r is not None:
            by_row.setdefault(r, []).append(t)
    for start, acts in stream_vocabulary(encoder, vocab, index.points, position, batch_size):
        flat = index.flatten(acts)  # [batch, total]
        obj = readout_values(flat, batch, slice(None))  # [batch, targets]
        value, row = obj.max(dim=0)
        better = value > best
        best = torch.where(better, value, best)
        best_row = torch.where(better, row + start, best_row)
        for r in set(by_row) & set(range(start, start + len(flat))):
            at_word[by_row[r]] = obj[r - start, by_row[r]]
    return WordStats(best, best_row, at_word)


@torch.no_grad()
def logit_word_stats(encoder: Encoder, vocab: Vocabulary, objectives: Sequence, batch_size: int = 1024) -> WordStats:
    """`word_stats` for class logits: every word alone (`[CLS] w [SEP]`) through the classifier."""
    head = objectives[0].classifier
    classes = torch.tensor([o.target_class for o in objectives])
    W = encoder.word_embeddings
    best = torch.full((len(objectives),), -torch.inf)
    best_row = torch.zeros(len(objectives), dtype=torch.long)
    for start in bar(range(0, len(vocab), batch_size), desc="vocabulary (class logits)"):
        ids = vocab.ids[start : start + batch_size]
        n = len(ids)
        input_ids = torch.stack([torch.full((n,), vocab.cls_id), ids, torch.full((n,), vocab.sep_id)], 1)
        logits = head(input_ids=input_ids.to(W.device)).logits.float().cpu()[:, classes]  # [batch, targets]
        value, row = logits.max(dim=0)
        better = value > best
        best, best_row = torch.where(better, value, best), torch.where(better, row + start, best_row)
    return WordStats(best, best_row, torch.full((len(objectives),), torch.nan))


@torch.no_grad()
def forward_word_stats(encoder: Encoder, vocab: Vocabulary, objectives: Sequence, target_rows: Sequence[int | None],
                       batch_size: int = 1024) -> WordStats:
    """`word_stats` for objectives without sites (attention weights): every word alone
    (`[CLS] w [SEP]`, as the vocabulary sweep reads it) through each objective, a batch at a time."""
    from ft.engine.evaluate import measure

    n = len(objectives)
    best, best_row = torch.full((n,), -torch.inf), torch.zeros(n, dtype=torch.long)
    at_word = torch.full((n,), torch.nan)
    for start in bar(range(0, len(vocab), batch_size), desc="vocabulary (forward)"):
        ids = vocab.ids[start : start + batch_size]
        m = len(ids)
        framed = torch.stack([torch.full((m,), vocab.cls_id), ids, torch.full((m,), vocab.sep_id)], 1)
        for t, objective in enumerate(objectives):
            values = measure(encoder.model, [objective] * m, framed, 1)  # [m]
            value, row = values.max(dim=0)
            if value > best[t]:
                best[t], best_row[t] = value, row + start
            w = target_rows[t]
            if w is not None and start <= w < start + m:
                at_word[t] = values[w - start]
    return WordStats(best, best_row, at_word)
