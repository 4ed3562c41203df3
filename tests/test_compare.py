"""ft.compare: one command runs every method at each length and tabulates them against the corpus."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from ft.compare import main
from ft.rundir.results import read_frontier, read_targets


def test_the_comparison_tabulates_every_method_against_the_corpus(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["--model", str(tiny_dir), "--out", str(out), "--lengths", "2", "--targets", "3", "--steps", "5",
                 "--search-steps", "4", "--candidates", "6", "--patience", "2", "--weights", "0", "0.5"]) == 0
    table = pd.read_parquet(out / "comparison.parquet")
    assert list(table.method) == ["tokens (w=0)", "tokens (w=0.5)", "best corpus n-gram", "best corpus sentence",
                                  "continuous (embedding)", "gumbel argmax", "PEZ (projected)"]
    assert table.targets.eq(3).all() and table.length.eq(2).all()
    run = out / "l2" / "tokens"
    frontier = read_frontier(run)
    corpus = pd.read_parquet(run / "examples.parquet")
    best_ngram = corpus[(corpus.kind == "ngram") & (corpus["rank"] == 0)].set_index("target_id").activation
    for w, row in zip([0, 0.5], table.head(2).itertuples(), strict=True):  # recomputed from the run's own files
        f = frontier[frontier.fluency_weight == w].set_index("target_id")
        assert row.mean_activation == pytest.approx(f.objective.mean())
        assert row.fluency == pytest.approx(f.fluency.mean())
        assert row.beats_ngram == pytest.approx((f.objective > best_ngram + 1e-6 * best_ngram.abs()).mean())
    ngram_row = table[table.method == "best corpus n-gram"].iloc[0]
    assert ngram_row.mean_activation == pytest.approx(best_ngram.mean()) and ngram_row.reaches_ngram == 1
    pez = read_targets(out / "l2" / "projected")
    assert table[table.method == "PEZ (projected)"].mean_activation.iloc[0] == pytest.approx(pez.objective.mean())
    html = (out / "report.html").read_text()
    assert "Comparison: optimized texts against the corpus" in html
    charts = re.findall(r'id="frontier-[^"]*" data-series="([^"]*)"', html)
    assert len(charts) == 3  # one frontier per target, a point per weight
    series = json.loads(charts[0].replace("&quot;", '"'))["frontier"]
    assert len(series[0]) == 2
    assert "w=0.5: " in html
    printed = capsys.readouterr().out
    assert "| 2 | tokens (w=0.5) |" in printed and "3 neurons" in printed


def test_bad_comparison_sizes_are_refused(tiny_dir, tmp_path, capsys):
    assert main(["--model", str(tiny_dir), "--out", str(tmp_path / "x"), "--lengths", "0"]) == 2
    assert "--lengths=[0]; valid: lengths in 1..32" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
