"""Correlation clusters (Poerner et al. 2018): units that fire together over a corpus, each
cluster one group target.

Every unit of `point` in `layers` is read at every token of a corpus's sentences, in context
(ft.targets.sae_demo.token_activations); units are joined by average-linkage agglomerative clustering on
the distance 1 - Pearson correlation (SciPy), cut into `num_clusters` clusters. A unit that never
varies over the corpus (a dead unit) has no correlation: it is left out. Clusters are numbered
largest first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch

from ft.core.errors import TargetError
from ft.core.typed import Choice, Int, Unique
from ft.model.sites import POINTS, Site, num_layers, point_width
from ft.targets.base import Target
from ft.targets.registry import BuildContext, SummaryContext, UnitKind, register

log = logging.getLogger("ft")


def correlation(acts: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(corr [U', U'], alive [U] bool): Pearson correlation over the tokens of the live units of
    `acts` [tokens, U] (those that vary)."""
    x = acts.double()
    x = x - x.mean(0)
    sd = x.pow(2).mean(0).sqrt()
    alive = sd > 1e-8 * max(float(sd.max()), 1e-30)
    z = x[:, alive] / sd[alive]
    corr = (z.T @ z / len(z)).clamp(-1, 1).numpy()
    return corr, alive.numpy()


@dataclass
class Clustering:
    labels: np.ndarray  # [U] cluster of each unit (0 = the largest), -1 for dead units
    corr: np.ndarray  # [U', U'] correlation of the live units
    alive: np.ndarray  # [U] bool

    def within_between(self) -> tuple[float, float]:
        """Mean correlation of pairs in one cluster, and of pairs in different clusters."""
        lab = self.labels[self.alive]
        same = lab[:, None] == lab[None, :]
        off = ~np.eye(len(lab), dtype=bool)
        w, b = self.corr[same & off], self.corr[~same]
        return (float(w.mean()) if w.size else float("nan")), (float(b.mean()) if b.size else float("nan"))


def cluster_units(acts: torch.Tensor, num_clusters: int) -> Clustering:
    """Average-linkage clusters of the columns of `acts` [tokens, U] on 1 - correlation."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    corr, alive = correlation(acts)
    n = int(alive.sum())
    if not 1 <= num_clusters <= n:
        raise TargetError(f"target.num_clusters={num_clusters}; valid 1..{n} (the units that vary over the corpus)")
    labels = np.full(len(alive), -1)
    if n == 1:
        labels[alive] = 0
        return Clustering(labels, corr, alive)
    dist = squareform(1.0 - corr, checks=False)
    raw = fcluster(linkage(dist, method="average"), t=num_clusters, criterion="maxclust")
    sizes = np.bincount(raw)
    order = sorted(set(raw.tolist()), key=lambda c: (-sizes[c], c))  # largest first, ties by first unit
    rename = {c: i for i, c in enumerate(order)}
    labels[alive] = [rename[c] for c in raw]
    return Clustering(labels, corr, alive)


def cluster_targets(encoder: object, num_clusters: int, point: str = "ffn_out", layers: Sequence[int] | None = None,
                    corpus: str = "packaged:lee", max_tokens: int = 20_000) -> list:
    """One group target per cluster (kind `cluster`): the mean of its units."""
    from ft.targets.base import Target
    from ft.targets.objectives import mean
    from ft.targets.sae_demo import token_activations

    model = encoder.model
    n_layers = num_layers(model)
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    if not layers or any(not 0 <= x < n_layers for x in layers):
        raise TargetError(f"target.layers={list(layers)}; valid: null (all) or layers in 0..{n_layers - 1}")
    if not isinstance(num_clusters, int) or isinstance(num_clusters, bool):
        raise TargetError(f"target.num_clusters={num_clusters!r}; valid: an integer >= 1")
    width = point_width(model, point)
    acts = token_activations(encoder, point, layers, corpus, limit=max_tokens, desc="cluster activations")
    result = cluster_units(acts, num_clusters)
    within, between = result.within_between()
    log.info("%d clusters of %d units over %d tokens: mean correlation %.3f within, %.3f between",
             num_clusters, int(result.alive.sum()), len(acts), within, between)
    sites = [Site(layers[i // width], point, i % width) for i in range(len(layers) * width)]
    out = []
    for c in range(int(result.labels.max()) + 1):
        members = [s for s, lab in zip(sites, result.labels, strict=True) if lab == c]
        t = Target("cluster", mean(members), k=len(members))
        t.meta.update(cluster=c, cluster_within=within, cluster_between=between)
        out.append(t)
    return out


@register
class ClusterKind(UnitKind):
    name = "cluster"
    option = "clusters"
    aliases = ("clusters",)  # the spelling of `target.kind` before one spelling per kind
    summary_line = "clusters of units that fire together on a corpus (target.num_clusters): their mean"
    keys = {"point": Choice(*POINTS), "layers": Annotated[list[Int(ge=0)], Unique] | None,
            "num_clusters": Int(ge=1), "corpus": str | None, "tokens": Int(ge=2)}
    one_layer = False
    report_table = "clusters"

    def check_model(self, t: dict, model: torch.nn.Module) -> None:
        n = num_layers(model)
        bad = [x for x in t.get("layers") or [] if not 0 <= x < n]
        if bad:
            raise TargetError(f"target.layers: layer {bad[0]} out of range; valid 0..{n - 1}")

    def sources(self, t: Any) -> dict[str, Path]:
        from ft.data.corpus import corpus_path

        return {"corpus": corpus_path(t.corpus)} if isinstance(t.get("corpus"), str) else {}

    def build(self, ctx: BuildContext) -> list[Target]:
        t = ctx.cfg.target
        return cluster_targets(ctx.encoder, t.num_clusters, t.point, t.layers, t.corpus, t.tokens)

    def label(self, t: Target) -> str:
        return f"cluster {t.target_id} ({t.k} units)"

    def summary(self, ctx: SummaryContext) -> dict[str, float]:  # the clustering's own quality over its corpus
        meta = ctx.targets[0].meta
        return {"clusters/count": len(ctx.targets), "clusters/within_corr": meta["cluster_within"],
                "clusters/between_corr": meta["cluster_between"]}
