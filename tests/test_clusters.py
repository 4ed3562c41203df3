"""Correlation clusters: units that fire together share a cluster, and clusters are tighter inside
than between; `target=clusters` textualizes each one as a group."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertModel

from ft.core.errors import TargetError
from ft.model.encoder import from_model
from ft.targets.kinds.cluster import cluster_targets, cluster_units, correlation
from ft.targets.sae_demo import token_activations


def test_correlation_matches_numpy_and_leaves_dead_units_out():
    torch.manual_seed(0)
    acts = torch.randn(200, 6)
    acts[:, 4] = 3.0  # a dead unit
    corr, alive = correlation(acts)
    assert alive.tolist() == [True, True, True, True, False, True]
    np.testing.assert_allclose(corr, np.corrcoef(acts[:, alive].numpy().T), atol=1e-9)


def test_planted_blocks_are_recovered():
    """Three latent signals, each copied (with noise and scale) into four units: three clusters,
    exactly those blocks, and the labels numbered largest first."""
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(500, 3, generator=g)
    cols = [0] * 5 + [1] * 4 + [2] * 3
    acts = torch.stack([latent[:, c] * (1 + i) + 0.1 * torch.randn(500, generator=g) for i, c in enumerate(cols)], 1)
    perm = torch.randperm(12, generator=g)
    acts, perm_cols = acts[:, perm], np.array(cols)[perm.numpy()]
    result = cluster_units(acts, 3)
    for c in range(3):  # each found cluster is one planted block
        assert len(set(perm_cols[result.labels == c])) == 1
    assert sorted(np.bincount(result.labels).tolist(), reverse=True) == np.bincount(result.labels).tolist()
    within, between = result.within_between()
    assert within > 0.9 and abs(between) < 0.2


def test_model_clusters_are_tighter_within_than_between(tiny):
    """On the tiny BERT over the packaged corpus, with units of layer 0 made copies of one unit:
    the copies share a cluster, and the mean within-cluster correlation (recomputed here from the
    activations with numpy) beats the between-cluster one."""
    model = BertModel(tiny.model.config)
    model.load_state_dict(tiny.model.state_dict())
    with torch.no_grad():
        out = model.encoder.layer[0].output.dense
        for u, scale in ((5, 2.0), (9, -0.5), (20, 3.0)):  # ffn_out units 5, 9, 20 follow unit 0 (or its mirror)
            out.weight[u] = scale * out.weight[0]
            out.bias[u] = scale * out.bias[0]
    enc = from_model(model.eval(), tiny.tokenizer, "planted")
    targets = cluster_targets(enc, 8, "ffn_out", [0, 1], "packaged:lee", 3000)
    assert [t.kind for t in targets] == ["cluster"] * len(targets) and len(targets) == 8
    member = {str(s): i for i, t in enumerate(targets) for s in t.sites}
    assert member["layer.0.ffn_out.0"] == member["layer.0.ffn_out.5"] == member["layer.0.ffn_out.20"]
    assert len(member) == 64  # every unit (2 layers x 32) in exactly one cluster
    acts = token_activations(enc, "ffn_out", [0, 1], "packaged:lee", limit=3000).numpy()
    corr = np.corrcoef(acts.T)
    lab = np.array([member[f"layer.{i // 32}.ffn_out.{i % 32}"] for i in range(64)])
    same, off = lab[:, None] == lab[None, :], ~np.eye(64, dtype=bool)
    within, between = corr[same & off].mean(), corr[~same].mean()
    assert within > between + 0.2
    assert targets[0].meta["cluster_within"] == pytest.approx(within, abs=1e-6)
    assert targets[0].meta["cluster_between"] == pytest.approx(between, abs=1e-6)
    with pytest.raises(TargetError, match="target.num_clusters=65; valid 1..64"):
        cluster_targets(enc, 65, "ffn_out", [0, 1], "packaged:lee", 3000)
    with pytest.raises(TargetError, match=r"target.layers=\[4\]; valid"):
        cluster_targets(enc, 3, "ffn_out", [4], "packaged:lee", 3000)


def test_clusters_are_textualized_as_groups(tiny_dir, tmp_path):
    from ft.rundir.results import read_summary, read_targets
    from ft.train import run
    from tests.test_train import compose_cfg

    cfg = compose_cfg([f"model.name_or_path={tiny_dir}", "target=clusters", "target.num_clusters=4",
                       "target.tokens=2000", "trainer.max_steps=5", "trainer.accelerator=cpu",
                       "logger.wandb.mode=disabled", "+trainer.enable_progress_bar=false"])
    run(cfg, tmp_path / "run")
    df = read_targets(tmp_path / "run")
    assert list(df.kind) == ["cluster"] * 4 and df.k.sum() == 64 and list(df.k) == sorted(df.k, reverse=True)
    assert sum(len(s) for s in df.sites) == 64
    summary = read_summary(tmp_path / "run")
    assert summary["clusters/count"] == 4 and summary["clusters/within_corr"] > summary["clusters/between_corr"]
    # the report lists every cluster with its size and most activating word
    from ft.cli.report import build_report
    from tests.test_report import table_rows

    html = build_report([str(tmp_path / "run")], tmp_path / "report.html", words=100).read_text()
    rows = table_rows(html, "clusters-table")
    assert [(r[1], r[2], r[4]) for r in rows] == [(str(r.target_id), str(r.k), r.most_activating_word)
                                                 for r in df.itertuples()]
