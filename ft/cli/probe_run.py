"""One `ft.probe` run: check the config, load the encoder, probe, ablate, and write the run
directory's files (probe.parquet, summary.json) through its manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from ft.core.errors import ConfigError
from ft.data.concepts import load_concept
from ft.measure.probe import (
    PROBE,
    PROBE_SUMMARY,
    ablate_probe,
    concept_activations,
    concept_label,
    control_labels,
    fit_probe,
    log,
    probeless,
    ranks,
    split_types,
)
from ft.measure.probe_ablation import ABLATION, ablation_summary
from ft.model.sites import Site, num_layers
from ft.rundir.kept import fingerprint, keep


def probe(cfg: DictConfig, run_dir: Path, encoder: object | None = None) -> dict[str, float]:
    """The probe run of `cfg` (configs/probe.yaml); writes probe.parquet and summary.json."""
    from ft.cli.schema import check_probe_config, check_probe_model
    from ft.model.encoder import load_encoder
    from ft.rundir.results import write_files

    p = cfg.probe
    check_probe_config(cfg)
    encoder = encoder or load_encoder(cfg.model.name_or_path, cfg.model.trust_remote_code)
    check_probe_model(cfg, encoder.model.config)
    concept_file = Path(str(cfg.concept)).expanduser()
    digest = fingerprint(concept_file) if concept_file.is_file() else None  # what load_concept reads
    concept = load_concept(cfg.concept, encoder.tokenizer, cfg.seed)
    n_layers = num_layers(encoder.model)
    layers = list(range(n_layers)) if cfg.layers is None else [int(x) for x in cfg.layers]
    if not layers or any(not 0 <= x < n_layers for x in layers):
        raise ConfigError(f"layers={list(layers)}; valid: null (all) or layers in 0..{n_layers - 1}")
    acts = concept_activations(encoder, concept, cfg.point, layers).numpy()  # [words, units]
    X = (acts - acts.mean(0)) / (acts.std(0) + 1e-6)
    types, labels = concept.words, concept.flat_labels
    test = split_types(types, float(p.test_fraction), cfg.seed)
    real = fit_probe(X, labels, test, float(p.l1_ratio), float(p.C), cfg.seed)
    control = fit_probe(X, control_labels(types, labels, cfg.seed), test, float(p.l1_ratio), float(p.C), cfg.seed)
    diff = probeless(X[~test], list(np.asarray(labels)[~test]))
    width = acts.shape[1] // len(layers)
    sites = [Site(layer, cfg.point, u) for layer in layers for u in range(width)]
    table = pd.DataFrame({"site": [str(s) for s in sites], "layer": [s.layer for s in sites],
                          "unit": [s.unit for s in sites], "weight_mass": real.weight_mass, "weight": real.weight,
                          "mean_diff": diff,
                          "rank_probe": ranks(real.weight_mass), "rank_probeless": ranks(diff)})
    top_probe = set(table.nsmallest(10, "rank_probe").site)
    top_less = set(table.nsmallest(10, "rank_probeless").site)
    summary = {"probe/accuracy": real.accuracy, "probe/control_accuracy": control.accuracy,
               "probe/selectivity": real.accuracy - control.accuracy,
               "probe/top10_overlap": len(top_probe & top_less) / 10,
               "probe/nonzero_weights": int((real.weight_mass > 0).sum()), "probe/units": len(sites),
               "probe/words": len(types), "probe/test_words": int(test.sum()),
               "probe/majority": float(pd.Series(np.asarray(labels)[test]).value_counts(normalize=True).iloc[0])}
    from omegaconf import OmegaConf

    summary["probe/concept_label"] = concept_label(labels)
    files = {PROBE: lambda q: table.to_parquet(q, index=False)}
    ab = cfg.get("ablate")
    if ab is not None and (ab.get("sites") or int(ab.get("top") or 0) > 0):
        drops = ablate_probe(cfg, encoder, concept, layers, table, real, acts, labels, test)
        summary |= ablation_summary(drops)
        files[ABLATION] = lambda q: drops.to_parquet(q, index=False)
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    files |= {"config.yaml": lambda q: q.write_text(config_text),
              PROBE_SUMMARY: lambda q: q.write_text(json.dumps(summary, indent=1))}
    if digest is not None:  # the run keeps the file it read (a copy changed since is refused: RunFileError)
        keep(run_dir, "concept", concept_file, digest=digest)
    write_files(run_dir, files)
    log.info("probe accuracy %.3f, control %.3f, selectivity %.3f", real.accuracy, control.accuracy,
             summary["probe/selectivity"])
    return summary
