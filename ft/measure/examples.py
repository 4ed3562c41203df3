"""Dataset examples beside the optimized inputs (`python -m ft.examples`, whose docstring is the
guide): corpus and n-gram search, pruning and local search of spans, the examples table."""

from __future__ import annotations

import logging
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ft.core.bars import bar
from ft.core.errors import ConfigError
from ft.data.corpus import DEFAULT_CORPUS, Corpus, load_corpus
from ft.measure.word_stats import weight_matrix
from ft.model.encoder import Encoder, load_encoder
from ft.model.sites import Site, SiteReader
from ft.model.substitutes import build_substitutes
from ft.rundir.results import atomic_write, read_config, read_directions, read_targets, target_label
from ft.targets import readouts_of_table
from ft.targets.objectives import Readout, Readouts
from ft.targets.registry import unit_kind, unit_kinds

log = logging.getLogger("ft")
EXAMPLES = "examples.parquet"
STOPWORDS = frozenset("""a about above after again against all am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for from further had has
have having he her here hers herself him himself his how i if in into is it its itself just me more most my
myself no nor not now of off on once only or other our ours ourselves out over own same she should so some
such than that the their theirs them themselves then there these they this those through to too under until
up very was we were what when where which while who whom why will with would you your yours yourself
yourselves 's""".split())


def is_stopword(token: str) -> bool:
    t = token.lower().removeprefix("##")
    return t in STOPWORDS or all(c in string.punctuation for c in t)


class TargetScorer:
    """Activations of many targets at every token of `[CLS] tokens [SEP]` sequences."""

    def __init__(self, encoder: Encoder, objectives: Sequence[Readout | Sequence[Site]], batch_size: int = 64):
        """`objectives`: one per target, any readout (a neuron, a group mean, terms, a direction)."""
        self.encoder, self.batch_size = encoder, batch_size
        model = encoder.model
        self.objectives = Readouts(model, objectives)
        self.index = self.objectives.index
        self.reader = SiteReader(model, self.index.points, self.index.max_layer, slice(None))
        features = sum((self.index.max_layer + 1) * self.index.width[p] for p in self.index.points)
        self.M = weight_matrix(self.index, slice(None), features).to(encoder.word_embeddings.device)
        tok = encoder.tokenizer
        self.cls_id, self.sep_id, self.pad_id = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id or 0

    @torch.no_grad()
    def batch(self, seqs: Sequence[Sequence[int]], columns: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, targets] at the tokens of each sequence (T = longest; padding = -inf)."""
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T + 2), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, s in enumerate(seqs):
            ids[b, : len(s) + 2] = torch.tensor([self.cls_id, *s, self.sep_id])
            mask[b, : len(s) + 2] = 1
        device = self.M.device
        acts = self.reader.read(input_ids=ids.to(device), attention_mask=mask.to(device))
        B, S = ids.shape
        flat = torch.cat([acts[p].float().permute(0, 2, 1, 3).reshape(B, S, -1) for p in self.index.points], -1)
        batch = self.objectives
        if batch.groups is not None or batch.has_bias:  # heads (norms), SAE latents (biases)
            rows = slice(None) if columns is None else columns
            out = batch.combine(flat[..., self.index.index[rows].to(device)], rows)[:, 1:-1].cpu()
        else:
            out = (flat @ (self.M if columns is None else self.M[:, columns]))[:, 1:-1].cpu()
        valid = mask[:, 2:].bool()  # token t of a sequence is valid when t < len(s)
        return out.masked_fill(~valid.unsqueeze(-1), -float("inf"))

    def at(self, seqs: Sequence[Sequence[int]], anchors: Sequence[int], target: int) -> torch.Tensor:
        """The activation of one target at one token (`anchors`, 0-based) of each sequence."""
        out = []
        for i in range(0, len(seqs), self.batch_size):
            a = self.batch(seqs[i : i + self.batch_size], torch.tensor([target]))[..., 0]
            out.append(a[torch.arange(len(a)), torch.tensor(anchors[i : i + self.batch_size])])
        return torch.cat(out)


def merge_top(scores: torch.Tensor, payloads: list[torch.Tensor], new_scores: torch.Tensor,
              new_payloads: list[torch.Tensor], n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Keep the n best per row of `scores` [targets, m] (and their payloads) after adding a batch."""
    scores = torch.cat([scores, new_scores], 1)
    scores, keep = scores.topk(min(n, scores.shape[1]), dim=1)
    return scores, [torch.cat([p, q], 1).gather(1, keep) for p, q in zip(payloads, new_payloads, strict=True)]


def corpus_search(scorer: TargetScorer, corpus: Corpus, top_n: int) -> tuple[torch.Tensor, ...]:
    """Per target the top-n sentences by max over positions: (scores, sentence, anchor) [targets, n]."""
    n_targets = scorer.M.shape[1]
    scores = torch.full((n_targets, 0), -float("inf"))
    kept = [torch.zeros((n_targets, 0), dtype=torch.long)] * 2  # sentence, anchor
    order = sorted(range(len(corpus)), key=lambda i: len(corpus.ids[i]))  # little padding
    for i in bar(range(0, len(order), scorer.batch_size), desc="corpus search", unit="batch"):
        idx = order[i : i + scorer.batch_size]
        best, pos = scorer.batch([corpus.ids[j] for j in idx]).max(dim=1)  # [B, targets]
        scores, kept = merge_top(scores, kept, best.T, [torch.tensor(idx).expand(n_targets, -1), pos.T], top_n)
    return scores, kept[0], kept[1]


def ngram_search(scorer: TargetScorer, corpus: Corpus, n: int, position: int, top_n: int,
                 tokens: Sequence[str]) -> tuple[list[tuple[int, ...]], torch.Tensor, torch.Tensor]:
    """Whole-word n-grams of the corpus read at `position` (1 = the n-gram's first token)."""
    grams: dict[tuple[int, ...], None] = {}
    for ids in corpus.ids:
        for s in range(len(ids) - n + 1):
            if tokens[ids[s]].startswith("##") or (s + n < len(ids) and tokens[ids[s + n]].startswith("##")):
                continue
            grams.setdefault(tuple(ids[s : s + n]))
    found = list(grams)
    if not found:
        raise ConfigError(f"the corpus has no whole-word {n}-grams; use a larger corpus or ngram=0")
    n_targets = scorer.M.shape[1]
    scores = torch.full((n_targets, 0), -float("inf"))
    which = [torch.zeros((n_targets, 0), dtype=torch.long)]
    step = scorer.batch_size * 4
    for i in bar(range(0, len(found), step), desc=f"{n}-gram search", unit="batch"):
        vals = scorer.batch(found[i : i + step])[:, position - 1]  # [B, targets]
        scores, which = merge_top(scores, which, vals.T, [torch.arange(i, i + len(vals)).expand(n_targets, -1)],
                                  top_n)  # memory stays bounded
    return found, scores, which[0]


@dataclass
class Span:
    start: int
    end: int
    activation: float


def passes(value: float, reference: float, max_drop: float) -> bool:
    """The anchor activation dropped by at most `max_drop` (a fraction) of |reference|."""
    return reference - value <= max_drop * abs(reference) + 1e-6 * max(1.0, abs(reference))


def prune(measure: Callable[[list[list[int]], list[int]], torch.Tensor], tokens: Sequence[int], anchor: int,
          max_drop: float = 0.6, window: int = 0, can_cut: Callable[[int], bool] | None = None) -> Span:
    """Foote's minimal activating example: the shortest end, then the latest start, that pass.

    `can_cut(i)`: whether a span may begin at token i or end just before it (e.g. not
    inside a word); every position by default.
    """
    tokens = list(tokens)
    can_cut = can_cut or (lambda i: True)
    reference = float(measure([tokens], [anchor])[0])
    ends = [e for e in range(min(anchor + 1 + window, len(tokens)), len(tokens)) if can_cut(e)]
    end, act = len(tokens), reference
    if ends:
        vals = measure([tokens[:e] for e in ends], [anchor] * len(ends))
        ok = [(e, float(v)) for e, v in zip(ends, vals, strict=True) if passes(float(v), reference, max_drop)]
        if ok:
            end, act = ok[0]
    starts = [s for s in range(1, max(anchor - window, 0) + 1) if can_cut(s)]
    start = 0
    if starts:
        vals = measure([tokens[s:end] for s in starts], [anchor - s for s in starts])
        ok = [(s, float(v)) for s, v in zip(starts, vals, strict=True) if passes(float(v), reference, max_drop)]
        if ok:
            start, act = ok[-1]
    return Span(start, end, act)


def local_search(measure: Callable[[list[list[int]], list[int]], torch.Tensor], tokens: Sequence[int],
                 anchor: int, substitutes: Callable, token_strings: Sequence[str], n: int,
                 pos_drop: float = 0.4, neg_drop: float = 0.7) -> list[dict]:
    """Variants of `tokens` with one non-stopword replaced; labelled positive / negative."""
    tokens = list(tokens)
    reference = float(measure([tokens], [anchor])[0])
    positions = [i for i, t in enumerate(tokens) if not is_stopword(token_strings[t])]
    if not positions:
        return []
    variants = [(i, new) for i, subs in zip(positions, substitutes(tokens, positions, n), strict=True)
                for new in subs]
    seqs = [tokens[:i] + [new] + tokens[i + 1 :] for i, new in variants]
    vals = measure(seqs, [anchor] * len(seqs))
    out = []
    for (i, new), seq, v in zip(variants, seqs, vals.tolist(), strict=True):
        drop = (reference - v) / max(abs(reference), 1e-8)
        label = "positive" if drop < pos_drop else "negative" if drop > neg_drop else None
        if label:
            out.append({"kind": label, "tokens": seq, "anchor": anchor, "activation": v, "drop": drop,
                        "replaced": f"{token_strings[tokens[i]]} -> {token_strings[new]}"})
    return out


def of_type(examples: pd.DataFrame, *types: str) -> pd.DataFrame:
    """The rows of examples.parquet of these example types (its `kind` column: `sentence`, `span`,
    `ngram`, ...; not a unit kind)."""
    return examples[examples["kind"].isin(types)]


def text_of(encoder: Encoder, ids: Sequence[int]) -> str:
    tok = encoder.tokenizer
    return tok.convert_tokens_to_string(tok.convert_ids_to_tokens(list(ids)))


def run_examples(run_dir: str | Path, corpus: str = DEFAULT_CORPUS, top_n: int = 5, ngram: int | None = None,
                 limit: int | None = None, mae_drop: float = 0.6, window: int = 0, pos_drop: float = 0.4,
                 neg_drop: float = 0.7, substitutes: int = 5, mlm: str = "auto", max_tokens: int = 64,
                 batch_size: int = 64) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Examples for the targets of a finished run; writes examples.parquet. Returns
    (examples, comparison: one row per target)."""
    for name, v in (("mae_drop", mae_drop), ("pos_drop", pos_drop), ("neg_drop", neg_drop)):
        if not 0 <= v <= 1:
            raise ConfigError(f"{name}={v}; valid: a fraction in [0, 1]")
    if pos_drop > neg_drop:
        raise ConfigError(f"pos_drop={pos_drop} > neg_drop={neg_drop}; valid: pos_drop <= neg_drop")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit={limit!r}; valid: an integer >= 1 (or none: every target)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}; valid: an integer >= 1")
    if top_n < 1 or substitutes < 0 or window < 0:
        raise ConfigError(f"top_n={top_n}, substitutes={substitutes}, window={window}; valid: top_n >= 1, "
                          "substitutes >= 0, window >= 0")
    run_dir = Path(run_dir)
    if not (run_dir / "targets.parquet").exists():
        raise ConfigError(f"{run_dir} is not a finished ft run (no targets.parquet)")
    cfg = read_config(run_dir)
    targets = read_targets(run_dir).sort_values("target_id")
    if limit and limit < len(targets):  # spread evenly over the run (its layers, its words)
        targets = targets.iloc[[round(i * (len(targets) - 1) / max(limit - 1, 1)) for i in range(limit)]]
    from ft.rundir.kept import model_to_load

    # the folder the run read, verified (a model changed since is refused), found from any directory
    encoder = load_encoder(model_to_load(run_dir, cfg.model.name_or_path),
                           bool(cfg.model.get("trust_remote_code", False)))
    tokens = encoder.tokenizer.convert_ids_to_tokens(list(range(encoder.vocab_size)))
    whole = sorted(k for k in set(targets.kind) if not unit_kind(k).token_examples)
    if whole:
        valid = ", ".join(n for n in unit_kinds() if unit_kind(n).token_examples)
        raise ConfigError(f"{run_dir} textualizes {whole[0]} targets, which score a whole input, not a token of a "
                          f"sentence; dataset examples score token-level objectives ({valid})")
    scorer = TargetScorer(encoder, readouts_of_table(encoder.model, targets, read_directions(run_dir), run_dir=run_dir),
                           batch_size)
    limit = type(encoder.arch).max_tokens(encoder.model.config)
    if limit is not None:  # the model's positions bound a sentence, with its two framing tokens
        max_tokens = min(max_tokens, limit - 2)
    text = load_corpus(corpus, encoder.tokenizer, max_tokens)
    subs = build_substitutes(mlm, encoder, cfg.model.name_or_path) if substitutes else None
    ngram = int(cfg.input.length) if ngram is None else ngram
    if ngram and not 1 <= int(cfg.position) <= ngram:
        raise ConfigError(f"ngram={ngram}: the run reads position {cfg.position}; valid: 0 (off) or "
                          f">= {cfg.position}")
    scores, sent, anchor = corpus_search(scorer, text, top_n)
    grams = ngram_search(scorer, text, ngram, int(cfg.position), top_n, tokens) if ngram else None
    rows: list[dict] = []
    compare: list[dict] = []
    for j, t in enumerate(bar(list(targets.itertuples()), desc="minimal examples + local search", unit="target")):
        def measure(seqs: list[list[int]], anchors: list[int], j: int = j) -> torch.Tensor:
            return scorer.at(seqs, anchors, j)

        base = {"target_id": int(t.target_id)}
        if isinstance(getattr(t, "text", None), str):  # input=tokens: the searched text beside the corpus's
            rows.append({**base, "kind": "searched", "rank": 0, "tokens": list(t.token_ids),
                         "anchor": int(cfg.position) - 1, "activation": float(t.objective)})
        for r in range(scores.shape[1]):
            ids = text.ids[int(sent[j, r])]
            rows.append({**base, "kind": "sentence", "rank": r, "tokens": ids, "anchor": int(anchor[j, r]),
                         "activation": float(scores[j, r]), "sentence": int(sent[j, r])})
        if grams:
            found, gscores, which = grams
            for r in range(gscores.shape[1]):
                rows.append({**base, "kind": "ngram", "rank": r, "tokens": list(found[int(which[j, r])]),
                             "anchor": int(cfg.position) - 1, "activation": float(gscores[j, r])})
        best = text.ids[int(sent[j, 0])]
        span = prune(measure, best, int(anchor[j, 0]), mae_drop, window,
                     lambda i, best=best: not tokens[best[i]].startswith("##"))  # whole words only
        mae, mae_anchor = best[span.start : span.end], int(anchor[j, 0]) - span.start
        rows.append({**base, "kind": "mae", "rank": 0, "tokens": mae, "anchor": mae_anchor,
                     "activation": span.activation, "sentence": int(sent[j, 0]),
                     "drop": (float(scores[j, 0]) - span.activation) / max(abs(float(scores[j, 0])), 1e-8)})
        found_local = (local_search(measure, mae, mae_anchor, subs, tokens, substitutes, pos_drop, neg_drop)
                       if subs else [])
        for r, ex in enumerate(sorted(found_local, key=lambda e: -e["activation"])):
            rows.append({**base, **ex, "rank": r, "substitutes_from": subs.name})
        compare.append({
            "target_id": int(t.target_id), "optimized": float(t.objective),
            "optimized_snapped": float(getattr(t, "snapped_activation", float("nan"))),
            "best_sentence": float(scores[j, 0]),
            "best_ngram": float(grams[1][j, 0]) if grams else float("nan"),
            "mae": span.activation, "mae_tokens": len(mae), "sentence_tokens": len(best),
            "most_activating_word": float(t.most_activating_word_activation),
            "searched_text": t.text if isinstance(getattr(t, "text", None), str) else None,
            "positives": sum(e["kind"] == "positive" for e in found_local),
            "negatives": sum(e["kind"] == "negative" for e in found_local),
        })
    df = pd.DataFrame(rows)
    df["text"] = [text_of(encoder, ids) for ids in df.tokens]
    df["anchor_token"] = [tokens[ids[a]] for ids, a in zip(df.tokens, df.anchor, strict=True)]
    df["tokens"] = [tokens_of(tokens, ids) for ids in df.tokens]
    df["substitutes_from"] = df.get("substitutes_from", pd.Series(index=df.index, dtype=object)).fillna("")
    df["corpus"] = corpus
    for col in ("drop", "sentence", "replaced"):
        if col not in df:
            df[col] = None
    df = df[["target_id", "kind", "rank", "text", "activation", "anchor", "anchor_token", "drop", "replaced",
             "substitutes_from", "sentence", "tokens", "corpus"]]
    atomic_write(run_dir / EXAMPLES, lambda p: df.to_parquet(p, index=False))
    return df, pd.DataFrame(compare)


def tokens_of(tokens: Sequence[str], ids: Sequence[int]) -> list[str]:
    return [tokens[i] for i in ids]


def summarize(compare: pd.DataFrame) -> dict[str, float]:
    keys = ["optimized", "optimized_snapped", "best_sentence", "best_ngram", "mae", "most_activating_word"]
    out = {f"examples/{k}_mean": float(compare[k].mean()) for k in keys}
    out["examples/optimized_beats_sentence_rate"] = float((compare.optimized > compare.best_sentence).mean())
    out["examples/snapped_beats_ngram_rate"] = float((compare.optimized_snapped > compare.best_ngram).mean())
    out["examples/mae_tokens_mean"] = float(compare.mae_tokens.mean())
    out["examples/sentence_tokens_mean"] = float(compare.sentence_tokens.mean())
    out["examples/positives_mean"] = float(compare.positives.mean())
    out["examples/negatives_mean"] = float(compare.negatives.mean())
    return out


def log_to_wandb(run_dir: Path, df: pd.DataFrame, compare: pd.DataFrame, summary: dict[str, float]) -> str | None:
    """Add the examples to the run's own W&B run (same id; offline unless logged in)."""
    from ft.rundir.tracking import WANDB_ID, wandb_mode

    id_file = run_dir / WANDB_ID
    mode = wandb_mode("auto")
    if not id_file.exists() or mode == "disabled":
        return None
    import wandb

    run_id = id_file.read_text().strip()
    # W&B names an offline run's folder by its start second: a resumption within the same second
    # would reuse the training run's folder, so wait for the next second
    if any(time.time() - d.stat().st_mtime < 2 for d in (run_dir / "wandb").glob(f"*-{run_id}")):
        time.sleep(2)
    run = wandb.init(id=run_id, resume="allow", dir=str(run_dir), mode=mode, project="ft")
    try:
        table = df.drop(columns=["tokens"]).head(5000).astype({"drop": float})
        run.log({"examples/examples": wandb.Table(dataframe=table),
                 "examples/comparison": wandb.Table(dataframe=compare)})
        run.summary.update(summary)
        return run.id
    finally:
        run.finish()


def target_labels(targets: pd.DataFrame) -> dict[int, str]:
    """target_id -> what a reader knows the target by: its site, or its target word and group."""
    return {int(t.target_id): target_label(t) for t in targets.itertuples()}
