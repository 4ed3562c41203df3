"""The top units of an `ft.probe` run (by its probe's ranking), as two expressions: their mean and,
for two labels, their sum weighted by the probe's signed weights. After the fit, the summary says
how much of each textualization is the probe's concept."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ft.core.errors import ConfigError
from ft.core.typed import Int
from ft.data.concepts import load_concept
from ft.rundir.kept import kept
from ft.targets.base import Target
from ft.targets.expressions import parse
from ft.targets.kinds.terms import terms_targets
from ft.targets.objectives import Objective
from ft.targets.registry import BuildContext, RebuildContext, SummaryContext, UnitKind, register


def probe_targets(model: torch.nn.Module, run: str, k: int) -> list[Target]:
    """The top `k` units of an ft.probe run (by rank_probe): their mean, and their sum weighted by
    the probe's signed weights (two labels only), each a terms target."""

    from ft.rundir.results import read_probe

    table = read_probe(run).sort_values("rank_probe")
    top = table.head(int(k))
    sites = list(top.site)
    specs = ["(" + " + ".join(sites) + f") / {len(sites)}"]
    weights = [float(w) for w in top.weight] if "weight" in top else []  # older probe runs: no signed weights
    if weights and all(math.isfinite(w) for w in weights) and any(w != 0 for w in weights):
        specs.append(" + ".join(f"{w:.6g} * {s}" for w, s in zip(weights, sites, strict=True) if w != 0)
                     .replace("+ -", "- "))
    out = terms_targets(model, specs)
    concept = probe_concept(run)
    for t, what in zip(out, ("mean", "weighted"), strict=False):
        t.kind = "probe"  # the expression of a probe run's units: labelled and summarized as such
        t.meta.update(probe_run=str(run), probe_readout=what, probe_concept=concept, probe_k=len(sites))
    return out


def probe_concept(run: str) -> str:
    """The concept an ft.probe run probed (its config's `concept`), or the run's folder name."""
    from ft.rundir.results import read_config

    try:
        concept = str(read_config(run).concept)
    except Exception:  # a probe run without a readable config still names itself
        return Path(str(run)).name
    return Path(concept).name if "/" in concept else concept  # a file by its name; builtin:months as is


def concept_label(labels: list[str]) -> str:
    """The concept's own label: `1` where the labels are 0/1, else the rarest (ties: the first)."""
    counts = pd.Series(labels).value_counts()
    return "1" if set(counts.index) == {"0", "1"} else str(counts.sort_values(kind="stable").index[0])


def concept_words(run: str | Path, tokenizer: object, reader: str | Path | None = None) -> set[str]:
    """The words of a probe run's concept that carry its concept label. The concept file is the
    kept copy (`ft.rundir.kept`) of the run `reader` (a run that textualized the probe's units), else of
    the probe run; only runs from before ft kept inputs re-read the original path."""
    from ft.rundir.results import read_config

    cfg = read_config(run)
    copy = (kept(reader, "concept") if reader is not None else None) or kept(run, "concept")
    concept = load_concept(str(copy) if copy is not None else cfg.concept, tokenizer, cfg.seed)
    label = concept_label(concept.flat_labels)
    return {w for w, lab in zip(concept.words, concept.flat_labels, strict=True) if lab == label}


def concept_scores(df: pd.DataFrame, run: str | Path, tokenizer: object,
                   reader: str | Path | None = None) -> dict[str, float]:
    """Adds to `df` (a run's targets) the share of each target's closest words, its most
    activating word and its searched text's tokens that are concept words; returns the means.
    `reader`: the textualizing run, whose kept concept file is read."""
    words = concept_words(run, tokenizer, reader)
    df["concept_closest_share"] = [sum(w in words for w in ws) / max(len(ws), 1) for ws in df.closest_words]
    df["concept_maw"] = [w in words for w in df.most_activating_word]
    out = {"probe/closest_in_concept": float(df.concept_closest_share.mean()),
           "probe/maw_in_concept": float(df.concept_maw.mean())}
    if "text" in df:
        toks = [tokenizer.convert_ids_to_tokens(list(i)) for i in df.token_ids]
        df["concept_text_share"] = [sum(t in words for t in ts) / max(len(ts), 1) for ts in toks]
        out["probe/text_in_concept"] = float(df.concept_text_share.mean())
    return out


def concept_file(probe_run: Path) -> Path | None:
    """The concept file of an ft.probe run: its kept copy (verified; the file it read), or for a
    probe run from before ft kept inputs the path in its config (None for a builtin concept or an
    unreadable run)."""
    from omegaconf import OmegaConf

    copy = kept(probe_run, "concept") if (probe_run / "config.yaml").is_file() else None
    if copy is not None:
        return copy
    try:
        concept = OmegaConf.load(probe_run / "config.yaml").get("concept")
    except Exception:  # no run there, or not YAML: probe_targets names the problem
        return None
    return Path(concept) if isinstance(concept, str) and Path(concept).is_file() else None


@register
class ProbeKind(UnitKind):
    name = "probe"
    option = "probe"
    summary_line = "an ft.probe run's top-k units (target.run, target.k): their mean and probe-weighted sum"
    keys = {"run": str | None, "k": Int(ge=1)}

    def check(self, t: dict) -> None:
        if not t.get("run") or not (Path(str(t["run"])) / "probe.parquet").is_file():
            raise ConfigError(f"target.run={t.get('run')!r}: not an ft.probe run directory (no probe.parquet); "
                              "valid: the run directory of `python -m ft.probe concept=...`")

    def sources(self, t: Any) -> dict[str, Path]:
        if not t.get("run"):
            return {}
        out = {"probe": Path(str(t.run)) / "probe.parquet"}
        concept = concept_file(Path(str(t.run)))
        if concept is not None:
            out["concept"] = concept
        return out

    def build(self, ctx: BuildContext) -> list[Target]:
        return probe_targets(ctx.encoder.model, ctx.cfg.target.run, ctx.cfg.target.k)

    def rebuild(self, row: Any, ctx: RebuildContext) -> Objective:
        return parse(row.spec, ctx.model, ctx.directions)

    def label(self, t: Target) -> str:
        m = t.meta
        return f"probe {m['probe_concept']} k={m['probe_k']} {m['probe_readout']}" if "probe_concept" in m else \
            super().label(t)

    def summary(self, ctx: SummaryContext) -> dict[str, float]:
        return concept_scores(ctx.table, ctx.cfg.target.run, ctx.encoder.tokenizer, ctx.run_dir)
