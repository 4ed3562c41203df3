"""The offline report: numbers equal the run tables; it renders in real headless Chromium."""

import re
import shutil
import subprocess

import pytest

from ft.dashboard import build_report as build_wandb_report
from ft.dashboard import build_workspace
from ft.report import build_report
from ft.results import load_runs, read_targets
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
    assert compare[: compare.index("</svg>")].count("<circle") == 3  # the script drew the runs


def test_wandb_workspace_builds_offline():
    workspace = build_workspace("someone", "ft")
    model = workspace._to_model()  # the spec W&B receives on save; no login needed
    text = model.model_dump_json()
    assert "final/activation_mean" in text and "group/target_top1_rate" in text
    report = build_wandb_report("someone", "ft")
    assert len(report.blocks) > 5


def test_runs_of_two_sweeps_get_distinct_names():
    from ft.report import name_runs, run_name

    paths = ["/r/sweep-a/000", "/r/sweep-b/000", "/r/sweep-a/001", "/r/default"]
    name_runs(paths)
    names = [run_name(p) for p in paths]
    assert names == ["sweep-a/000", "sweep-b/000", "001", "default"] and len(set(names)) == 4
