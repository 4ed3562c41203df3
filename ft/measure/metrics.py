"""Final measurements of a run: per-target rows (DESIGN §4 columns) and their aggregates.

Everything is recomputed in float32 from the saved input by a fresh forward pass, so the
numbers do not depend on the precision or the path used during optimization.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torchmetrics import Metric
from torchmetrics.functional import pairwise_cosine_similarity

from ft.engine.evaluate import measure  # noqa: F401  (ft.measure.metrics.measure, as before)
from ft.engine.module import full_sequence
from ft.engine.state import FitResult
from ft.measure.word_stats import WordStats, word_stats
from ft.model.arch import adapter
from ft.model.encoder import Encoder
from ft.model.vocab import Vocabulary
from ft.targets import Target
from ft.targets.objectives import Readout
from ft.targets.registry import unit_kind

TOP_N = 20


def target_word_rows(vocab: Vocabulary, targets: Sequence[Target]) -> list[int | None]:
    """Each target's target word as a Vocabulary row (None for a target without one)."""
    row_of = vocab.row_of()
    return [None if t.target_word is None else row_of[t.target_word] for t in targets]


@dataclass
class VocabFacts:
    """Vocabulary-side facts a run is measured against."""

    vocab: Vocabulary
    word_vectors: torch.Tensor  # [V', hidden]: words through the embedding layer (analysis space)
    words: WordStats  # per target: most activating word, target word's activation

    @classmethod
    def build(cls, vocab: Vocabulary, word_vectors: torch.Tensor, sweeps: dict[str, torch.Tensor],
              model: torch.nn.Module, targets: Sequence[Target]) -> VocabFacts:
        rows = target_word_rows(vocab, targets)
        return cls(vocab, word_vectors, word_stats(sweeps, model, [t.readout for t in targets], rows))


class TextualizationSummary(Metric):
    """Aggregates over targets: means, std, ratio of means, per-layer means, group rates."""

    full_state_update = False
    FIELDS = (
        "activation", "maw_activation", "closest_cos", "analysis_norm", "raw_norm",
        "closest_is_maw", "layer", "target_cos", "target_top1", "target_top20",
        "target_word_activation", "is_group", "snapped_activation",
    )

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        for name in self.FIELDS:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, **values: torch.Tensor) -> None:
        for name, v in values.items():
            getattr(self, name).append(v.detach().float().flatten())

    def _cat(self, name: str) -> torch.Tensor:
        v = getattr(self, name)
        if isinstance(v, torch.Tensor):
            return v
        return torch.cat(v) if v else torch.empty(0)

    def compute(self) -> dict[str, float]:
        act, maw = self._cat("activation"), self._cat("maw_activation")
        out = {
            "final/activation_mean": act.mean(),
            "final/activation_std": act.std(correction=0),
            "final/maw_activation_mean": maw.mean(),
            "final/maw_activation_std": maw.std(correction=0),
            "final/activation_ratio": act.mean() / maw.mean(),
            "final/closest_cos_mean": self._cat("closest_cos").mean(),
            "final/closest_cos_std": self._cat("closest_cos").std(correction=0),
            "final/analysis_norm_mean": self._cat("analysis_norm").mean(),
            "final/raw_norm_mean": self._cat("raw_norm").mean(),
            "final/closest_is_maw_rate": self._cat("closest_is_maw").mean(),
            "final/snapped_activation_mean": self._cat("snapped_activation").mean(),
        }
        layer = self._cat("layer")
        if layer.numel():
            for lay in sorted({int(v) for v in layer.tolist()} - {-1}):
                m = layer == lay
                out[f"layer_{lay}/activation_mean"] = act[m].mean()
                out[f"layer_{lay}/maw_activation_mean"] = maw[m].mean()
                out[f"layer_{lay}/closest_cos_mean"] = self._cat("closest_cos")[m].mean()
        g = self._cat("is_group").bool()
        if g.any():
            cos = self._cat("target_cos")[g]
            out["group/target_cos_mean"] = cos.mean()
            out["group/target_cos_std"] = cos.std(correction=0)
            out["group/target_top1_rate"] = self._cat("target_top1")[g].mean()
            out["group/target_top20_rate"] = self._cat("target_top20")[g].mean()
            out["group/target_word_activation_mean"] = self._cat("target_word_activation")[g].mean()
            out["group/activation_mean"] = act[g].mean()
        return {k: float(v) for k, v in out.items()}


def closest_words(
    analysis: torch.Tensor, word_vectors: torch.Tensor, n: int = TOP_N
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine of each analysis vector to every word: (all cosines, top-n values, top-n rows)."""
    cos = pairwise_cosine_similarity(analysis.float(), word_vectors.float())
    top = torch.topk(cos, min(n, cos.shape[1]), dim=1)
    return cos, top.values, top.indices


def closest_in_chunks(
    analysis: torch.Tensor, word_vectors: torch.Tensor, target_rows: Sequence[int | None],
    n: int = TOP_N, chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`closest_words` a chunk of targets at a time (never [targets, V'] at once): top-n
    cosines and rows, and each target word's cosine and rank (NaN / 0 without one)."""
    tops, rows, tw_cos, tw_rank = [], [], [], []
    for start in range(0, len(analysis), chunk):
        cos, top_cos, top_rows = closest_words(analysis[start : start + chunk], word_vectors, n)
        tops.append(top_cos)
        rows.append(top_rows)
        for j, w in enumerate(target_rows[start : start + chunk]):
            tw_cos.append(float("nan") if w is None else float(cos[j, w]))
            tw_rank.append(0 if w is None else int((cos[j] > cos[j, w]).sum()) + 1)
    return torch.cat(tops), torch.cat(rows), torch.tensor(tw_cos), torch.tensor(tw_rank)


@torch.no_grad()
def analysis_of(model: torch.nn.Module, seq: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """[rows, l, E]: the embeddings module's output at the optimized positions (the analysis space)."""
    a = adapter(model)
    device = a.word_embeddings.device
    with torch.autocast(device_type=device.type, enabled=False):
        return torch.cat([a.embed(inputs_embeds=seq[i : i + chunk].to(device).float())[:, 1:-1].float().cpu()
                          for i in range(0, len(seq), chunk)])


@torch.no_grad()
def snap(result: FitResult, objectives: Sequence[Readout], facts: VocabFacts, encoder: Encoder, position: int,
         analysis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Discrete readout: vocabulary rows [T, l] and the objective of `[CLS] tokens [SEP]`.

    Probability-based inputs (softmax, gumbel) snap to their argmax token; the others to
    the nearest word by cosine in the analysis space.
    """
    vocab = facts.vocab
    if result.token_rows is not None:
        rows = result.token_rows
    else:
        flat = analysis.reshape(-1, analysis.shape[-1])
        rows = closest_in_chunks(flat, facts.word_vectors, [None] * len(flat), n=1)[1].reshape(analysis.shape[:2])
    W = encoder.word_embeddings.detach().float().cpu()
    seq = full_sequence(W[vocab.ids[rows]], W, vocab.cls_id, vocab.sep_id)
    return rows, measure(encoder.model, objectives, seq, position)


@torch.no_grad()
def sae_post_activations(result: FitResult, targets: Sequence[Target], encoder: Encoder, position: int
                         ) -> torch.Tensor | None:
    """[rows] each SAE latent's post-activation (ReLU, JumpReLU or TopK over all latents) for the
    saved input; None when the run has no SAE targets."""
    rows = [i for i, t in enumerate(targets) if t.meta.get("sae") is not None]  # SAE latents: their SAE
    if not rows:
        return None
    from ft.model.sites import SiteReader

    out = torch.full((len(targets),), torch.nan)
    W = encoder.word_embeddings.detach().float().cpu()
    vocab_cls, vocab_sep = encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id
    for i in rows:
        t = targets[i]
        layer, point, sae = t.meta["layer"], t.meta["point"], t.meta["sae"]
        seq = full_sequence(result.embeds[i : i + 1], W, vocab_cls, vocab_sep).to(encoder.word_embeddings.device)
        with torch.autocast(device_type=seq.device.type, enabled=False):
            h = SiteReader(encoder.model, [point], layer, position).read(inputs_embeds=seq)[point][:, layer]
        out[i] = sae.encode(h.float().cpu())[0, t.latent]
    return out


def evaluate(
    result: FitResult,
    targets: Sequence[Target],
    facts: VocabFacts,
    encoder: Encoder,
    position: int,
    runaway_factor: float = 100.0,
) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """Per-target table (DESIGN §4 columns) and the tensors to save, from a fit's plain result."""
    W = encoder.word_embeddings.detach().float().cpu()
    embeds, obj = result.embeds, result.objectives
    analysis = analysis_of(encoder.model, full_sequence(embeds, W, facts.vocab.cls_id, facts.vocab.sep_id))
    tok = position - 1  # which optimized token the metrics look at
    a_tok = analysis[:, tok]
    word_rows = target_word_rows(facts.vocab, targets)
    top_cos, top_rows, tw_cos, tw_rank = closest_in_chunks(a_tok, facts.word_vectors, word_rows)
    maw_act, maw_row = facts.words.max_activation, facts.words.max_row
    raw_norm = embeds[:, tok].norm(dim=-1)
    word_raw_max = W.norm(dim=-1).max()
    diverged = ~torch.isfinite(obj) | ~torch.isfinite(raw_norm) | result.diverged
    runaway = raw_norm > runaway_factor * word_raw_max  # still a result, but flagged and logged
    if bool(runaway.any()):
        rank_zero_warn(f"{int(runaway.sum())} of {len(runaway)} inputs ran away: raw norm above "
                       f"{runaway_factor:g}x the largest word embedding norm (see raw_norm, runaway)")
    snapped_rows, snapped_act = snap(result, [t.readout for t in targets], facts, encoder, position, analysis)
    post = sae_post_activations(result, targets, encoder, position)
    entropy = result.entropy
    tokens = facts.vocab.tokens
    rows = []
    for t, target in enumerate(targets):
        closest = [tokens[int(r)] for r in top_rows[t]]
        row = {
            "target_id": target.target_id if target.target_id >= 0 else t,
            "restart": target.restart,
            "kind": target.kind,
            "sites": target.reads,
            "spec": target.spec,
            "direction": target.direction,
            "direction_name": target.direction_name,
            "latent": target.latent,
            "sae_path": target.sae_path,
            "sae_post": None if post is None or bool(post[t].isnan()) else float(post[t]),
            "target_class": target.target_class,
            "label": target.label,
            "class_label": target.meta.get("label"),
            "layer": target.layer,
            "target_word": target.target_word,
            "k": target.k,
            "selection": target.selection,
            "objective": float(obj[t]),
            "most_activating_word": tokens[int(maw_row[t])],
            "most_activating_word_activation": float(maw_act[t]),
            "target_word_activation": None,
            "closest_words": closest,
            "closest_cos": [float(c) for c in top_cos[t]],
            "closest_is_most_activating": bool(top_rows[t, 0] == maw_row[t]),
            "target_word_cos": None,
            "target_word_rank": None,
            "target_in_top1": None,
            "target_in_top20": None,
            "analysis_norm": float(a_tok[t].norm()),
            "raw_norm": float(raw_norm[t]),
            "snapped_tokens": [tokens[int(r)] for r in snapped_rows[t]],
            "snapped_activation": float(snapped_act[t]),
            "snap_gap": float(obj[t] - snapped_act[t]),
            "entropy": None if entropy is None else float(entropy[t]),
            "steps": int(result.steps[t]),
            "kept_step": int(result.kept_step[t]),
            "converged": bool(result.converged[t]),
            "diverged": bool(diverged[t]),
            "runaway": bool(runaway[t]),
        }
        if target.target_word is not None:
            rank = int(tw_rank[t])
            row.update(
                target_word_activation=float(facts.words.at_target_word[t]),
                target_word_cos=float(tw_cos[t]),
                target_word_rank=rank,
                target_in_top1=rank == 1,
                target_in_top20=rank <= TOP_N,
            )
        rows.append(row)
    df = pd.DataFrame(rows)
    if result.token_ids is not None:  # input=tokens: the searched text itself
        ids = [[int(i) for i in row] for row in result.token_ids]
        tok = encoder.tokenizer
        df["token_ids"] = ids
        df["text"] = [tok.decode(i) for i in ids]
        df["retokenizes"] = [tok(t, add_special_tokens=False)["input_ids"] == i
                             for t, i in zip(df.text, ids, strict=True)]
    static_readings(df, targets, encoder, facts)
    if result.fluency is not None:  # and the search's fluency: the frontier's axes
        df["fluency"] = result.fluency.double().numpy()
        df["fluency_weight"] = result.fluency_weight.double().numpy()
        df["fluency_source"] = result.fluency_source
    tensors = {"embeds": embeds.contiguous(), "analysis": analysis.contiguous(), **result.extra}
    return df, tensors


def static_readings(df: pd.DataFrame, targets: Sequence[Target], encoder: Encoder, facts: VocabFacts) -> None:
    """Single-unit targets get their static readings (ft.static: no forward pass) as columns."""
    from ft.model.static import COLUMNS, readings

    sites = [t.sites[0] if unit_kind(t.kind).static_readings and len(t.sites) == 1 else None for t in targets]
    if all(s is None for s in sites):
        return
    found = readings(encoder.model, facts.vocab, sites)
    for c in COLUMNS:
        df[c] = found[c]


def _col(values: pd.Series, dtype: type = float) -> torch.Tensor:
    return torch.tensor(values.to_numpy(dtype), dtype=torch.float32)


def summarize(df: pd.DataFrame) -> dict[str, float]:
    """Aggregates of a targets table (one run, or merged shards); diverged rows left out."""
    ok = df[~df["diverged"].astype(bool)]
    summary = TextualizationSummary(sync_on_compute=False)  # the table is already complete
    groups = ok["target_word"].notna()
    summary.update(
        activation=_col(ok["objective"]),
        maw_activation=_col(ok["most_activating_word_activation"]),
        closest_cos=_col(ok["closest_cos"].map(lambda c: c[0])),
        analysis_norm=_col(ok["analysis_norm"]),
        raw_norm=_col(ok["raw_norm"]),
        snapped_activation=_col(ok["snapped_activation"]),
        closest_is_maw=_col(ok["closest_is_most_activating"], bool),
        layer=_col(ok["layer"].fillna(-1)),
        is_group=_col(groups, bool),
        target_cos=_col(ok["target_word_cos"].where(groups, 0.0)),
        target_top1=_col(ok["target_in_top1"].where(groups, False), bool),
        target_top20=_col(ok["target_in_top20"].where(groups, False), bool),
        target_word_activation=_col(ok["target_word_activation"].where(groups, 0.0)),
    )
    out = summary.compute() if len(ok) else {}
    out["final/diverged_count"] = float(df["diverged"].astype(bool).sum())
    out["final/runaway_count"] = float(df["runaway"].astype(bool).sum()) if "runaway" in df else 0.0
    out["final/num_targets"] = float(len(df))
    out["final/steps_mean"] = float(df["steps"].mean())
    out["final/converged_rate"] = float(df["converged"].astype(bool).mean())
    if df["entropy"].notna().any():
        out["final/entropy_mean"] = float(df["entropy"].mean())
    return out
