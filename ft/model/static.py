"""Static readings of units: what a unit's weights say about the vocabulary, with no forward pass
(Geva et al. 2022; Dar et al. 2023). `python -m ft.static`'s docstring says what each reading is."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from ft.core.errors import ConfigError
from ft.model.arch import adapter
from ft.model.sites import Site

TOP = 10
HIDDEN_POINTS = ("ffn_out", "attn_out", "resid")
COLUMNS = ("static_promotes", "static_suppresses", "static_detects")


@torch.no_grad()
def vocab_matrix(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """E [V', hidden]: the allowed tokens' word embeddings in the hidden space (float32)."""
    a = adapter(model)
    W = a.word_embeddings.detach()[ids.to(a.word_embeddings.device)]
    return a.to_hidden(W).float().cpu()


@torch.no_grad()
def unit_vectors(model: torch.nn.Module, layer: int, point: str, units: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(write [n, hidden], read [n, hidden] or None) for `units` of a point; None: no reading."""
    a = adapter(model)
    if point == "ffn_act":
        w_in, _, w_out, _ = a.ffn_weights(layer)
        inter = w_out.shape[1]  # gated FFNs stack [input; gate] in W_in: the input half is first
        return w_out.detach()[:, units].T.float().cpu(), w_in.detach()[:inter][units].float().cpu()
    if point in HIDDEN_POINTS:
        eye = torch.eye(a.hidden_size)[units]
        return eye, None
    return None


def top_tokens(scores: torch.Tensor, tokens: Sequence[str], k: int, largest: bool = True) -> list[list[str]]:
    """[n, V'] -> per row the k tokens with the largest (or smallest) score."""
    idx = scores.topk(min(k, scores.shape[1]), dim=1, largest=largest).indices
    return [[tokens[int(i)] for i in row] for row in idx]


def readings(model: torch.nn.Module, vocab: object, sites: Sequence[Site | None], k: int = TOP
             ) -> dict[str, list[list[str] | None]]:
    """Per site (None: not a single unit), its static readings; one product per (layer, point)."""
    E = vocab_matrix(model, vocab.ids)
    out: dict[str, list[list[str] | None]] = {c: [None] * len(sites) for c in COLUMNS}
    groups: dict[tuple[int, str], list[int]] = {}
    for i, s in enumerate(sites):
        if s is not None:
            groups.setdefault((s.layer, s.point), []).append(i)
    for (layer, point), rows in groups.items():
        units = torch.tensor([sites[i].unit for i in rows])
        vectors = unit_vectors(model, layer, point, units)
        if vectors is None:
            continue
        write, read = vectors
        scores = write @ E.T  # [n, V']
        for name, vals in (("static_promotes", top_tokens(scores, vocab.tokens, k)),
                           ("static_suppresses", top_tokens(scores, vocab.tokens, k, largest=False))):
            for i, v in zip(rows, vals, strict=True):
                out[name][i] = v
        if read is not None:
            for i, v in zip(rows, top_tokens(read @ E.T, vocab.tokens, k), strict=True):
                out["static_detects"][i] = v
    return out


def agreement(df: pd.DataFrame) -> float:
    """Share of the targets with a static reading whose most activating word is among its static
    tokens (promoted, suppressed or detected)."""
    have = df["static_promotes"].notna()
    if not bool(have.any()):
        return float("nan")
    hits = [r.most_activating_word in set(r.static_promotes) | set(r.static_suppresses)
            | set(r.static_detects if r.static_detects is not None else [])
            for r in df[have].itertuples()]
    return float(sum(hits) / len(hits))


def check_points(points: Sequence[str]) -> None:
    """Points with a static reading, each once (a repeated point would repeat every unit's row)."""
    for i, point in enumerate(points):
        if point not in ("ffn_act", *HIDDEN_POINTS):
            raise ConfigError(f"point {point!r} has no static reading; valid: ffn_act, {', '.join(HIDDEN_POINTS)}")
        if point in points[:i]:
            raise ConfigError(f"--points {' '.join(points)} repeats {point!r}; valid: each point once")


def all_units(model: torch.nn.Module, vocab: object, points: Sequence[str], k: int = TOP) -> pd.DataFrame:
    """Every unit of `points` in every layer: one row each (site, layer, point, unit, readings)."""
    a = adapter(model)
    rows = []
    check_points(points)
    for point in points:
        for layer in range(a.num_layers):
            sites = [Site(layer, point, u) for u in range(a.point_width(point))]
            r = readings(model, vocab, sites, k)
            for i, s in enumerate(sites):
                rows.append({"site": str(s), "layer": layer, "point": point, "unit": s.unit,
                             **{c: r[c][i] for c in COLUMNS}})
    return pd.DataFrame(rows)
