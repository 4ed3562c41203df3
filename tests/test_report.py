"""The offline report: numbers equal the run tables; it renders in real headless Chromium."""

import json
import re
import shutil
import subprocess
from html import unescape

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import t as scipy_t

from ft.cli.report import build_report
from ft.dashboard import build_report as build_wandb_report
from ft.dashboard import build_workspace
from ft.rundir.results import load_runs, read_curves, read_inputs, read_targets
from tests.test_train import compose_cfg, run_isolated, tiny_overrides

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for exp in ("default", "group_k10", "group_k10_abs"):
        run_isolated(compose_cfg(tiny_overrides(tiny_dir, exp, steps=8)), root / exp, root)
    return root


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    build_report([str(runs)], out, words=200)
    return out


def cell(html: str, key: str) -> float:
    m = re.search(rf'data-v="([^"]+)" data-key="{re.escape(key)}"', html)
    assert m, key
    return float(m.group(1))


def test_load_runs_flattens_configs(runs):
    targets, table = load_runs([str(runs / "*")])
    assert len(table) == 3 and set(table.experiment) == {"default", "group_k10", "group_k10_abs"}
    assert set(table.selection.dropna()) == {"relative", "absolute"} and set(table.k.dropna()) == {8}
    assert len(targets) == sum(len(read_targets(p)) for p in table.path)


def test_report_numbers_equal_the_tables(runs, report):
    html = report.read_text()
    d = read_targets(runs / "default")
    ratio = d.objective.mean() / d.most_activating_word_activation.mean()
    assert cell(html, f"table1:{runs / 'default'}:ratio") == pytest.approx(ratio, rel=1e-9)
    assert cell(html, f"table1:{runs / 'default'}:analysis_norm") == pytest.approx(d.analysis_norm.mean())
    for exp in ("group_k10", "group_k10_abs"):
        g = read_targets(runs / exp)
        assert cell(html, f"table4:{runs / exp}:top1") == pytest.approx(g.target_in_top1.mean())
        assert cell(html, f"table4:{runs / exp}:top20") == pytest.approx(g.target_in_top20.mean())


@pytest.mark.slow
def test_report_renders_in_chromium_without_js_errors(report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is missing: the README's test command installs Debian's chromium"
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          "--virtual-time-budget=5000", "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    for table_id in ("table1", "table2", "table34", "table5", "runs-table"):
        assert f'id="{table_id}"' in dom
    for fig in ('id="fig5"', 'id="curves"', 'id="fig3-default"', 'id="fig4-default"'):
        assert fig in dom
    assert re.search(r'<pre id="js-errors"></pre>', dom), "JavaScript errors on the page"
    compare = dom[dom.index('id="compare-svg"'):]
    compare = compare[: compare.index("</svg>")]
    assert compare.count("<circle") == 3  # the script drew the runs
    # grouped by target_kind: the two group runs are one line across the experiments, each group in the legend
    assert compare.count('class="cmp-line"') == 1 and 'data-group="group"' in compare
    assert "target_kind=group" in compare and "target_kind=neuron" in compare


def test_wandb_workspace_builds_offline():
    workspace = build_workspace("someone", "ft")
    model = workspace._to_model()  # the spec W&B receives on save; no login needed
    text = model.model_dump_json()
    assert "final/activation_mean" in text and "group/target_top1_rate" in text
    report = build_wandb_report("someone", "ft")
    assert len(report.blocks) > 5


def test_runs_of_two_sweeps_get_distinct_names():
    from ft.cli.report_parts import name_runs, run_key

    paths = ["/r/sweep-a/000", "/r/sweep-b/000", "/r/sweep-a/001", "/r/default"]
    name_runs(paths)
    names = [run_key(p) for p in paths]
    assert names == ["sweep-a/000", "sweep-b/000", "001", "default"] and len(set(names)) == 4


def series(html: str, chart_id: str) -> dict[str, list[list[float]]]:
    m = re.search(rf'<svg class="chart" id="{re.escape(chart_id)}" data-series="([^"]*)"', html)
    assert m, chart_id
    return json.loads(unescape(m.group(1)))


def table_rows(html: str, table_id: str) -> list[list[str]]:
    body = re.search(rf'<table class="sortable" id="{table_id}">.*?<tbody>(.*?)</tbody>', html, re.S).group(1)
    return [[unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", tr)] for tr in re.findall(r"<tr>(.*?)</tr>", body)]


def test_figures_and_regressions_are_the_runs_data(runs, report):
    """Figs. 2-4 per layer, the curves, and each regression's slope, t and p recomputed from the
    tables (least squares by hand; p from Student's t)."""
    html = report.read_text()
    d = read_targets(runs / "default")
    per = d.groupby("layer")
    fig3 = series(html, "fig3-default")
    assert fig3["optimized input"] == [list(per.groups), pytest.approx(list(per.objective.mean()))]
    assert fig3["most activating word"][1] == pytest.approx(list(per.most_activating_word_activation.mean()))
    first = d.closest_cos.map(lambda c: c[0])
    assert series(html, "fig4-default")["closest-word cosine"][1] == pytest.approx(list(first.groupby(d.layer).mean()))
    curves = read_curves(runs / "default").groupby("step").objective.mean()
    assert series(html, "curves")["default"] == [list(curves.index), pytest.approx(list(curves.values))]
    for what, y in (("objective", d.objective), ("maw", d.most_activating_word_activation), ("cos", first)):
        m = re.search(rf'data-key="reg:{re.escape(str(runs / "default"))}:{what}" data-slope="([^"]+)" '
                      r'data-t="([^"]+)" data-p="([^"]+)"', html)
        assert m, what
        x, yv = d.layer.to_numpy(float), y.to_numpy(float)
        slope = ((x - x.mean()) * (yv - yv.mean())).sum() / ((x - x.mean()) ** 2).sum()
        resid = yv - (yv.mean() + slope * (x - x.mean()))
        se = np.sqrt((resid ** 2).sum() / (len(x) - 2) / ((x - x.mean()) ** 2).sum())
        p = 2 * scipy_t.sf(abs(slope / se), len(x) - 2)
        assert float(m.group(1)) == pytest.approx(slope, rel=1e-6)
        assert float(m.group(2)) == pytest.approx(slope / se, rel=1e-6)
        assert float(m.group(3)) == pytest.approx(p, rel=1e-6)


def test_pca_is_of_the_saved_analysis_vectors_and_the_words(runs, report, tiny):
    """Fig. 5: the principal components of every run's saved analysis vectors with a seeded
    sample of the words in the analysis space, recomputed (up to each axis's sign)."""
    from tests.reference import analysis_by_hand

    html = report.read_text()
    _, table = load_runs([str(runs)])
    opt = np.concatenate([read_inputs(p)["analysis"][:, 0].numpy() for p in table.path])
    special = set(tiny.tokenizer.all_special_ids)
    ids = torch.tensor(sorted(i for i in tiny.tokenizer.get_vocab().values() if i not in special))
    words = analysis_by_hand(tiny.model, tiny.word_embeddings.detach()[ids][:, None], 1)[:, 0].numpy()
    idx = np.random.default_rng(0).choice(len(words), size=min(200, len(words)), replace=False)
    data = np.concatenate([opt, words[idx]])
    centered = data - data.mean(0)
    xy = centered @ np.linalg.svd(centered, full_matrices=False)[2][:2].T
    got = series(html, "fig5")
    pts = np.array([got["optimized inputs"][0] + got["words"][0], got["optimized inputs"][1] + got["words"][1]]).T
    assert len(got["optimized inputs"][0]) == len(opt) and len(got["words"][0]) == len(idx)
    for axis in range(2):
        sign = np.sign(pts[0, axis]) * np.sign(xy[0, axis])
        np.testing.assert_allclose(pts[:, axis], sign * xy[:, axis], rtol=1e-4, atol=1e-4)


def test_tables_2_and_5_show_the_runs_rows(runs, report):
    html = report.read_text()
    d = read_targets(runs / "default")
    lo, hi = d.layer.min(), d.layer.max()
    sample = pd.concat([d[d.layer == lo].head(3), d[d.layer == hi].head(3)])
    rows = table_rows(html, "table2")
    assert [r[0] for r in rows] == [s[0] for s in sample.sites]
    assert [r[3] for r in rows] == list(sample.most_activating_word)
    for r, (_, s) in zip(rows, sample.iterrows(), strict=True):
        assert r[2] == ", ".join(f"{w} ({c:.2f})" for w, c in zip(s.closest_words[:3], s.closest_cos[:3], strict=True))
    t5 = table_rows(html, "table5")
    expect = []
    for exp in ("group_k10", "group_k10_abs"):
        g = read_targets(runs / exp).head(3)
        expect += [[r.target_word, r.selection, str(r.k), ", ".join(f"{w} ({c:.2f})" for w, c in zip(
            r.closest_words[:5], r.closest_cos[:5], strict=True)), str(r.target_word_rank)] for r in g.itertuples()]
    assert sorted(t5) == sorted(expect)


def fake_run(path, overrides: list[str] | None, **values):
    """A run directory's config.yaml (and Hydra's overrides.yaml): all the labels read."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"experiment_name": "default", "run_name": None, "seed": 0,
                            "optim": {"lr": 0.1}, "target": {"kind": "neuron", "seed": "${seed}"}})
    for key, value in values.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    path.mkdir(parents=True)
    OmegaConf.save(cfg, path / "config.yaml")
    if overrides is not None:
        (path / ".hydra").mkdir()
        OmegaConf.save(OmegaConf.create(overrides), path / ".hydra" / "overrides.yaml")
    return str(path)


def test_runs_are_labelled_by_run_name_or_the_values_that_differ(tmp_path):
    from ft.cli.report_parts import name_runs, run_key, run_name

    a = fake_run(tmp_path / "m" / "0", ["optim.lr=0.1"], run_name="default-optim.lr=0.1")
    b = fake_run(tmp_path / "m" / "1", ["optim.lr=0.3", "seed=2"], run_name="default-optim.lr=0.3-seed=2",
                 optim__lr=0.3, seed=2)
    c = fake_run(tmp_path / "n" / "0", ["run_name=baseline"], run_name="baseline")
    d = fake_run(tmp_path / "g" / "0", None, experiment_name="group_k10", target__kind="group")
    e = fake_run(tmp_path / "g" / "1", None, experiment_name="group_k10", target__kind="group", run_name="mine")
    name_runs([a, b, c, d, e])
    assert [run_name(p) for p in (a, b, c, d, e)] == [
        "default optim.lr=0.1 seed=0", "default optim.lr=0.3 seed=2", "baseline", "group_k10", "mine"]
    assert run_key(a) == "m/0" and run_key(d) == "g/0"  # element ids stay the folder names
    twins = [fake_run(tmp_path / "t" / str(i), []) for i in range(2)]
    name_runs(twins)
    assert [run_name(p) for p in twins] == ["default (0)", "default (1)"]


def svg_of(html: str, chart_id: str) -> str:
    start = html.index(f'id="{chart_id}"')
    return html[start:html.index("</svg>", start)]


def ticks(svg: str, axis: str) -> list[float]:
    return [float(v) for v in re.findall(rf'class="k t{axis}">([^<]+)</text>', svg)]


def test_charts_have_coloured_legends_and_round_ticks(report, runs):
    html = report.read_text()
    assert not re.search(r"\.legend\{[^}]*fill", html)  # no CSS rule greys the legend out
    for chart_id in ("curves", "fig3-default", "fig5"):
        svg = svg_of(html, chart_id)
        legend = re.findall(r'<text [^>]*style="fill:(#[0-9a-f]{6})" class="legend"[^>]*>([^<]+)</text>', svg)
        names = list(series(html, chart_id))
        assert [n for _, n in legend] == names and len({c for c, _ in legend}) == len(names)
        lines = re.findall(r'stroke="(#[0-9a-f]{6})" stroke-width', svg) or re.findall(r'fill="(#[0-9a-f]{6})"', svg)
        assert set(lines) == {c for c, _ in legend}  # each curve has its legend's colour
        for axis in ("x", "y"):
            t = ticks(svg, axis)
            steps = np.diff(t)
            assert len(t) >= 2 and np.allclose(steps, steps[0])
            mantissa = steps[0] / 10 ** np.floor(np.log10(steps[0]))
            assert any(np.isclose(mantissa, m) for m in (1, 2, 2.5, 5))
            values = [v for xs_ys in series(html, chart_id).values() for v in xs_ys["xy".index(axis)]]
            assert t[0] <= min(values) and t[-1] >= max(values)
    assert ticks(svg_of(html, "fig3-default"), "x") == [0.0, 1.0]  # the tiny model's two layers


def test_one_layer_chart_has_sane_axes():
    from ft.cli.svg import chart

    svg = chart({"a": ([5], [2.0]), "b": ([5], [7.5])}, "one layer", "layer", "activation")
    assert ticks(svg, "x") == [4.0, 5.0, 6.0]
    y = ticks(svg, "y")
    assert y[0] <= 2.0 and y[-1] >= 7.5 and "nan" not in svg.lower() and len(y) <= 7


def test_curves_end_at_the_final_step(runs):
    for exp in ("default", "group_k10"):
        curves, targets = read_curves(runs / exp), read_targets(runs / exp)
        assert curves.step.max() == targets.steps.max() - 1 == 7  # 8 steps, curve_every=10
        assert sorted(curves.step.unique()) == [0, 7]


@pytest.mark.slow
def test_atlas_filters_by_layer_and_search(report, runs, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    d = read_targets(runs / "default")
    word = d.most_activating_word.iloc[0]

    def visible(fragment: str) -> tuple[list[str], str]:
        dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                              "--virtual-time-budget=5000", "--dump-dom", report.as_uri() + fragment],
                             capture_output=True, text=True, timeout=120).stdout
        shown = re.findall(r'<details class="atlas" data-layer="(\d*)" data-text="([^"]*)"(?! style="display: none;")',
                           dom)
        count = re.search(r'<span id="atlas-count">([^<]*)</span>', dom).group(1)
        return shown, count

    shown, count = visible("#layer=1")
    total = len(re.findall(r'<details class="atlas"', report.read_text()))
    assert shown and {layer for layer, _ in shown} == {"1"} and count == f"{len(shown)} of {total}"
    shown, _ = visible(f"#q={word}")
    assert shown and all(word.lower() in unescape(text) for _, text in shown) and len(shown) < total


def test_synced_runs_link_to_their_wandb_page(runs, tmp_path, monkeypatch):
    """A run whose W&B log printed its page links there; an offline run that `wandb sync` uploaded
    links to entity/project/runs/<id>; a run that stayed offline has no link."""
    from ft.cli.report_parts import wandb_url

    online, synced, offline = (tmp_path / n for n in ("online", "synced", "offline"))
    for d in (online, synced, offline):
        shutil.copytree(runs / "default", d)
    (online / "wandb" / "run-20261201_000000-abc123" / "logs").mkdir(parents=True)
    (online / "wandb" / "run-20261201_000000-abc123" / "logs" / "debug.log").write_text(
        "... View run at https://wandb.ai/me/ft/runs/abc123\n")
    (synced / "wandb" / "offline-run-1").mkdir(parents=True)
    (synced / "wandb" / "offline-run-1" / "run-def456.wandb.synced").write_text("")
    (synced / "wandb_id").write_text("def456\n")
    monkeypatch.setenv("WANDB_ENTITY", "lab")
    assert wandb_url(str(online)) == "https://wandb.ai/me/ft/runs/abc123"
    assert wandb_url(str(synced)) == "https://wandb.ai/lab/ft/runs/def456"
    assert wandb_url(str(offline)) is None
    html = build_report([str(online), str(synced), str(offline)], tmp_path / "r.html", words=100).read_text()
    links = re.findall(r'<a class="wandb" href="([^"]+)">', html)
    assert sorted(links) == ["https://wandb.ai/lab/ft/runs/def456", "https://wandb.ai/me/ft/runs/abc123"]
