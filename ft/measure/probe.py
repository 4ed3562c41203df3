"""The steps of a probe (`python -m ft.probe`, whose docstring is the guide): concept activations,
the type-split logistic probe and its control task, probeless rankings, ablation sets."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from ft.core.errors import ConfigError
from ft.data.concepts import Concept
from ft.measure.probe_ablation import ablation_sets, ablation_table, find_mlm, masked_tokens
from ft.model.sites import Site, SiteReader, register_point_hook
from ft.targets.kinds.probe import concept_label, concept_scores, concept_words  # noqa: F401 (as before)

log = logging.getLogger("ft")
PROBE, PROBE_SUMMARY = "probe.parquet", "summary.json"


@torch.no_grad()
def concept_activations(encoder: object, concept: Concept, point: str, layers: list[int], batch_size: int = 256
                        ) -> torch.Tensor:
    """[words, len(layers) * width]: every unit of `point` in `layers`, for each labelled word."""
    model, tok = encoder.model, encoder.tokenizer
    device = encoder.word_embeddings.device
    if concept.is_word_list:
        ids = torch.tensor(tok.convert_tokens_to_ids(concept.words))
        reader = SiteReader(model, [point], max(layers), 1)
        out = []
        for s in range(0, len(ids), batch_size):
            part = ids[s:s + batch_size]
            cls, sep = torch.full_like(part, tok.cls_token_id), torch.full_like(part, tok.sep_token_id)
            seq = torch.stack([cls, part, sep], 1)
            acts = reader.read(input_ids=seq.to(device))[point].float().cpu()  # [b, layers, width]
            out.append(acts[:, layers].flatten(1))
        return torch.cat(out)
    rows = []
    most = max_positions(model)
    for n, words in enumerate(concept.sentences, 1):  # in context: each word at its first piece
        enc = tok(words, is_split_into_words=True, return_tensors="pt", truncation=False)
        if most is not None and enc["input_ids"].shape[1] > most:
            raise ConfigError(f"concept={concept.name}: sentence {n} ({' '.join(words[:5])} ...) is "
                              f"{enc['input_ids'].shape[1]} tokens with [CLS] and [SEP]; valid: sentences of at "
                              f"most {most} tokens, what the model takes")
        first: dict[int, int] = {}
        for pos, w in enumerate(enc.word_ids()):
            if w is not None and w not in first:
                first[w] = pos
        if len(first) < len(words):
            raise ConfigError(f"concept={concept.name}: a sentence is longer than the model takes "
                              f"({len(words)} words); valid: shorter sentences")
        seen: dict[int, torch.Tensor] = {}
        handles = [register_point_hook(model, layer, point,
                                       lambda t, layer=layer, seen=seen: seen.__setitem__(layer, t[0]))
                   for layer in layers]
        try:
            model(**{k: v.to(device) for k, v in enc.items()})
        finally:
            for h in handles:
                h.remove()
        pos = torch.tensor([first[i] for i in range(len(words))])
        rows.append(torch.cat([seen[layer][pos].float().cpu() for layer in layers], dim=1))
    return torch.cat(rows)


def max_positions(model: torch.nn.Module) -> int | None:
    """How many tokens the model takes, special tokens included (None: no limit)."""
    from ft.model.arch import adapter_class

    return adapter_class(model.config).max_tokens(model.config)


def split_types(types: list[str], test_fraction: float, seed: int) -> np.ndarray:
    """[words] bool: held out; whole word types go to one side."""
    distinct = sorted(set(types))
    rng = random.Random(seed)
    rng.shuffle(distinct)
    n_test = max(1, round(test_fraction * len(distinct)))
    held = set(distinct[:n_test])
    return np.array([t in held for t in types])


def control_labels(types: list[str], labels: list[str], seed: int) -> list[str]:
    """Hewitt and Liang's control task: a random label per word type, from the label distribution."""
    rng = random.Random(seed + 1)
    draw: dict[str, str] = {}
    for t in sorted(set(types)):
        draw[t] = rng.choice(labels)
    return [draw[t] for t in types]


@dataclass
class ProbeFit:
    accuracy: float
    weight_mass: np.ndarray  # [units] sum over classes of |w|
    weight: np.ndarray  # [units] signed weight toward the concept label (binary), NaN otherwise
    classifier: object = None  # the fitted scikit-learn probe

    def score(self, X: np.ndarray, y: list[str], test: np.ndarray) -> float:
        """Accuracy on the held-out rows of `X` [words, units] (standardized as the fit's)."""
        return float((self.classifier.predict(X[test]) == np.asarray(y)[test]).mean())


def fit_probe(X: np.ndarray, y: list[str], test: np.ndarray, l1_ratio: float, C: float, seed: int) -> ProbeFit:
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y)
    if len(set(y[~test])) < 2:
        raise ConfigError("the training split has one label only; valid: a concept with more words, or a smaller "
                          "probe.test_fraction")
    import sklearn

    old = tuple(int(x) for x in sklearn.__version__.split(".")[:2]) < (1, 8)  # before 1.8 the penalty is named
    clf = LogisticRegression(l1_ratio=l1_ratio, C=C, solver="saga", max_iter=3000, random_state=seed,
                             **({"penalty": "elasticnet"} if old else {}))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # saga's convergence and penalty deprecation notes
        clf.fit(X[~test], y[~test])
    acc = float((clf.predict(X[test]) == y[test]).mean())
    signed = np.full(X.shape[1], np.nan)
    if len(clf.classes_) == 2:  # coef_ points toward classes_[1]; flip it toward the concept label
        signed = clf.coef_[0] * (1 if clf.classes_[1] == concept_label(list(y)) else -1)
    return ProbeFit(acc, np.abs(clf.coef_).sum(0), signed, clf)


def probeless(X: np.ndarray, y: list[str]) -> np.ndarray:
    """[units] the largest |mean of a class - mean of the rest| (standardized activations)."""
    y = np.asarray(y)
    return np.max([np.abs(X[y == c].mean(0) - X[y != c].mean(0)) for c in sorted(set(y))], axis=0)


def ranks(score: np.ndarray) -> np.ndarray:
    """1 = the largest score (ties by unit order)."""
    order = np.argsort(-score, kind="stable")
    out = np.empty(len(score), dtype=np.int64)
    out[order] = np.arange(1, len(score) + 1)
    return out


def ablate_probe(cfg: DictConfig, encoder: object, concept: Concept, layers: list[int], table: pd.DataFrame,
                 fit: ProbeFit, acts: np.ndarray, labels: list[str], test: np.ndarray) -> pd.DataFrame:
    """The probe's (and the masked LM's) accuracy with the top units, explicit sites or random
    units ablated (ft.measure.probe_ablation)."""
    from ft.data.corpus import DEFAULT_CORPUS, load_corpus

    a = cfg.ablate
    sets = ablation_sets(table, cfg, encoder.model)
    mu, sd = acts.mean(0), acts.std(0) + 1e-6

    def probe_accuracy() -> float:
        X = (concept_activations(encoder, concept, cfg.point, layers).numpy() - mu) / sd
        return fit.score(X, labels, test)

    def means(sites: list[Site]) -> list[float]:  # each site's mean over the concept's words
        out: dict[Site, float] = {}
        for point in sorted({s.point for s in sites}):
            mine = sorted(s for s in sites if s.point == point)
            lay = sorted({s.layer for s in mine})
            m = concept_activations(encoder, concept, point, lay).mean(0).view(len(lay), -1)
            out |= {s: float(m[lay.index(s.layer), s.unit]) for s in mine}
        return [out[s] for s in sites]

    mlm = find_mlm(a.get("mlm", "auto"), encoder, encoder.name, cfg.model.trust_remote_code)
    data = None
    if mlm is not None:
        tok = encoder.tokenizer
        longest = type(encoder.arch).max_tokens(encoder.model.config)  # with the two framing tokens
        corpus = load_corpus(a.get("mlm_corpus") or DEFAULT_CORPUS, tok,
                             max_tokens=48 if longest is None else min(48, longest - 2))
        n = int(a.get("mlm_sentences", 200))
        if n < 1:
            raise ConfigError(f"ablate.mlm_sentences={n}; valid: an integer >= 1")
        data = masked_tokens(corpus.ids[:n], tok.cls_token_id, tok.sep_token_id, tok.mask_token_id,
                             tok.pad_token_id, seed=int(cfg.seed))
    return ablation_table(sets, encoder.model, means, probe_accuracy, str(a.mode), mlm, data)


