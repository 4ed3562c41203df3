"""`python -m ft.report RUNS... [-o report.html]`: the paper's tables and figures, offline.

RUNS are run directories, folders above them (sweeps, shards) or globs. The page is one
self-contained HTML file: inline SVG figures, a few lines of inline JavaScript (sortable
tables, the comparison chart), no CDN. Sections whose data the runs lack say so.
"""

from __future__ import annotations

import time
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd

from ft.cli.report_parts import (
    CONFIG_COLUMNS,
    CSS,
    DAMAGED,
    JS,
    finite_rows,
    fmt,
    ms,
    name_runs,
    of_table,
    regression,
    run_key,
    run_name,
    secondary,
    table,
    wandb_url,
    word_vectors_for,
)
from ft.cli.svg import chart
from ft.measure.examples import of_type
from ft.rundir.results import (
    atomic_write,
    load_runs,
    read_curves,
    read_frontier,
    read_inputs,
    read_targets,
    target_label,
)

# The paper's numbers (Baeumel et al. 2023, bert-base-uncased), shown beside ft's.
PAPER_TABLE4 = {("absolute", 10): (0.01, 0.03), ("absolute", 100): (0.22, 0.32),
                ("absolute", 250): (0.36, 0.59), ("absolute", 450): (0.53, 0.66),
                ("relative", 10): (0.00, 0.02), ("relative", 100): (0.48, 0.63),
                ("relative", 250): (0.67, 0.75), ("relative", 450): (0.65, 0.68)}


def section_table1(targets: pd.DataFrame, runs: pd.DataFrame) -> str:
    neurons = of_table(targets, "neurons")
    if neurons.empty:
        return '<p class="note">No single-neuron runs among these runs.</p>'
    rows, keys = [], {}
    for i, (run, d) in enumerate(neurons.groupby("run", sort=False)):
        info = runs.set_index("run").loc[run]
        rows.append({"run": run_name(run), "experiment": info.experiment, "input": info.input,
                     "optimizer": info.optimizer, "neurons": len(d),
                     "activation (optimized)": ms(d.objective),
                     "activation (most activating word)": ms(d.most_activating_word_activation),
                     "ratio of means": float(d.objective.mean() / d.most_activating_word_activation.mean()),
                     "cos(closest word)": ms(d.closest_cos.map(lambda c: c[0])),
                     "magnitude (optimized)": float(d.analysis_norm.mean()),
                     "magnitude (words)": info.get("final/word_analysis_norm_mean"),
                     "closest = most activating": float(d.closest_is_most_activating.mean())})
        keys[(i, "ratio of means")] = f"table1:{run}:ratio"
        keys[(i, "magnitude (optimized)")] = f"table1:{run}:analysis_norm"
    cols = list(rows[0])
    return (table(rows, cols, "table1", keys) + '<p class="note">Paper (bert-base): optimized 42.523 '
            "(σ=10.15) vs word 1.283 (σ=1.935); cos 0.124 (σ=0.02); magnitude 21.818 vs 16.867; "
            "closest = most activating in 0.3%.</p>")


def section_layers(targets: pd.DataFrame) -> str:
    neurons = of_table(targets, "neurons").dropna(subset=["layer"])
    if neurons.empty:
        return '<p class="note">No single-neuron runs: no per-layer figures.</p>'
    figs = []
    for run, d in neurons.groupby("run", sort=False):
        per = d.groupby("layer")
        layers = list(per.groups)
        act = chart({"optimized input": (layers, list(per.objective.mean())),
                     "most activating word": (layers, list(per.most_activating_word_activation.mean()))},
                    f"Fig. 2-3 activation per layer — {run_name(run)}", "layer", "activation",
                    chart_id=f"fig3-{run_key(run)}")
        cos = chart({"closest-word cosine": (layers, list(per.closest_cos.apply(
            lambda s: float(np.mean([c[0] for c in s])))))},
            f"Fig. 4 closest-word cosine per layer — {run_name(run)}", "layer", "cosine",
            chart_id=f"fig4-{run_key(run)}")
        first = d.closest_cos.map(lambda c: c[0])
        key = f"reg:{run}"
        figs.append(f'<div class="figs">{act}{cos}</div><p>optimized: '
                    f'{regression(d.layer, d.objective, f"{key}:objective")}; most activating word: '
                    f"{regression(d.layer, d.most_activating_word_activation, f'{key}:maw')}; "
                    f"cosine: {regression(d.layer, first, f'{key}:cos')}</p>")
    return "".join(figs)


def section_table2(targets: pd.DataFrame) -> str:
    neurons = of_table(targets, "neurons").dropna(subset=["layer"])
    if neurons.empty:
        return '<p class="note">No single-neuron runs.</p>'
    lo, hi = neurons.layer.min(), neurons.layer.max()
    sample = pd.concat([neurons[neurons.layer == lo].head(3), neurons[neurons.layer == hi].head(3)])
    rows = [{"site": r.sites[0], "layer": int(r.layer), "top 3 closest words": ", ".join(
        f"{w} ({c:.2f})" for w, c in zip(r.closest_words[:3], r.closest_cos[:3], strict=True)),
        "most activating word": r.most_activating_word} for r in sample.itertuples()]
    return table(rows, list(rows[0]), "table2")


def section_groups(targets: pd.DataFrame) -> str:
    groups = of_table(targets, "groups")
    if groups.empty:
        return '<p class="note">No neuron-group runs among these runs.</p>'
    rows, keys = [], {}
    for i, ((run, sel, k), d) in enumerate(groups.groupby(["run", "selection", "k"], sort=False)):
        paper = PAPER_TABLE4.get((sel, int(k)), (None, None))
        rows.append({"run": run_name(run), "selection": sel, "k": int(k), "groups": len(d),
                     "cos(optimized, target word)": ms(d.target_word_cos),
                     "activation (optimized)": ms(d.objective),
                     "activation (target word)": ms(d.target_word_activation),
                     "target is closest": float(d.target_in_top1.astype(float).mean()),
                     "paper": paper[0],
                     "target in top 20": float(d.target_in_top20.astype(float).mean()),
                     "paper ": paper[1]})
        keys[(i, "target is closest")] = f"table4:{run}:top1"
        keys[(i, "target in top 20")] = f"table4:{run}:top20"
    examples = [{"target word": r.target_word, "selection": r.selection, "k": int(r.k),
                 "closest words": ", ".join(f"{w} ({c:.2f})" for w, c in
                                            zip(r.closest_words[:5], r.closest_cos[:5], strict=True)),
                 "rank of target": r.target_word_rank}
                for r in groups.groupby(["run", "selection", "k"], sort=False).head(3).itertuples()]
    return ("<h3>Tables 3-4: target words by group configuration</h3>" + table(rows, list(rows[0]), "table34", keys)
            + "<h3>Table 5: example groups</h3>" + table(examples, list(examples[0]), "table5"))


def section_pca(runs: pd.DataFrame, words: int) -> str:
    same = runs[runs.model == runs.model.iloc[0]] if "model" in runs and len(runs) else runs
    left_out = len(runs) - len(same)  # one analysis space per model: the first run's model
    runs = same
    read = [secondary(lambda p=p: read_inputs(p)["analysis"][:, 0].float().numpy(), Path(p) / "inputs.safetensors")
            for p in runs.path]
    opt = [x for x in read if x is not None]
    if not opt:
        return '<p class="note">No inputs.</p>'
    opt_all = np.concatenate(opt)
    diverged = len(opt_all) - len(finite_rows(opt_all))
    opt_all = finite_rows(opt_all)  # a diverged target's inf or NaN would break the SVD
    if not len(opt_all):
        return '<p class="note">No finite optimized inputs (every target diverged).</p>'
    wv = word_vectors_for(runs.path.iloc[0], words) if words else None
    data = opt_all if wv is None else np.concatenate([opt_all, wv])
    centered = data - data.mean(0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    xy = centered @ vt[:2].T
    series = {"optimized inputs": (list(xy[: len(opt_all), 0]), list(xy[: len(opt_all), 1]))}
    note = ""
    if wv is None:
        note = '<p class="note">Vocabulary vectors unavailable (model not loadable): optimized inputs only.</p>'
    else:
        series["words"] = (list(xy[len(opt_all):, 0]), list(xy[len(opt_all):, 1]))
    if left_out:
        note += (f'<p class="note">The runs of {escape(str(runs.model.iloc[0]))} only: {left_out} run(s) of other '
                 "models live in other analysis spaces.</p>")
    if diverged:
        note += f'<p class="note">{diverged} diverged target(s) (inf or NaN inputs) left out.</p>'
    return chart(series, "Fig. 5 PCA of optimized inputs and words (analysis space)", "PC1", "PC2",
                 mark="scatter", chart_id="fig5") + note


def section_curves(runs: pd.DataFrame) -> str:
    series = {}
    for p in runs.path:
        c = secondary(lambda p=p: read_curves(p), Path(p) / "curves.parquet")
        if c is not None and len(c):
            c = c[np.isfinite(c.objective.astype(float))]  # a diverged target's -inf
            m = c.groupby("step").objective.mean()
            series[run_name(p)] = (list(m.index), list(m.values))
    if not series:
        return '<p class="note">No activation curves recorded in these runs.</p>'
    return chart(series, "Mean activation over steps", "step", "activation", chart_id="curves")


def section_compare(runs: pd.DataFrame) -> str:
    metrics = [c for c in runs.columns if "/" in c]
    configs = [c for c in CONFIG_COLUMNS if c in runs.columns and runs[c].notna().any()]
    opts = lambda cs, sel: "".join(f'<option{" selected" if c == sel else ""}>{escape(c)}</option>' for c in cs)  # noqa: E731
    y0 = "final/activation_mean" if "final/activation_mean" in metrics else (metrics or [""])[0]
    varied = [c for c in configs if runs[c].astype(str).nunique() > 1]  # x: what tells the runs apart
    x0 = (varied or ["experiment"])[0]
    g0 = varied[1] if len(varied) > 1 else ""  # group by the second thing that tells runs apart
    groups = '<option value="">none</option>' + opts(configs, g0)
    controls = (f'<label>x <select id="cmp-x">{opts(configs, x0)}</select></label> '
                f'<label>y <select id="cmp-y">{opts(metrics, y0)}</select></label> '
                f'<label>group by <select id="cmp-g">{groups}</select></label>')
    svg = '<svg id="compare-svg" viewBox="0 0 560 320" width="560" height="320" xmlns="http://www.w3.org/2000/svg"></svg>'
    rows = runs[["run", *configs, *metrics]].to_dict("records")
    links = [wandb_url(p) for p in runs.path]
    for r in rows:
        r["run"] = run_name(r["run"])
    html = table(rows, ["run", *configs, *metrics], "runs-table")
    for r, url in zip(rows, links, strict=True):  # a synced run's name links to its W&B page
        if url:
            cell = f"<td>{fmt(r['run'])}</td>"
            html = html.replace(cell, f'<td><a class="wandb" href="{escape(url)}">{fmt(r["run"])}</a></td>', 1)
    return controls + "<br>" + svg + '<div class="scroll">' + html + "</div>"


def section_atlas(targets: pd.DataFrame, runs: pd.DataFrame, per_run: int) -> str:
    out = []
    for p in runs.path:
        d = targets[targets.run == p].head(per_run)
        curves = secondary(lambda p=p: read_curves(p), Path(p) / "curves.parquet")
        examples_path = Path(p) / "examples.parquet"
        examples = (secondary(lambda q=examples_path: pd.read_parquet(q), examples_path) if examples_path.exists()
                    else None)
        for r in d.itertuples():
            name = target_label(r)
            close = ", ".join(f"{escape(w)} ({c:.2f})"
                              for w, c in zip(r.closest_words[:10], r.closest_cos[:10], strict=True))
            parts = [f"<p>objective {r.objective:.3f}; most activating word <b>{escape(r.most_activating_word)}</b> "
                     f"({r.most_activating_word_activation:.3f}); steps {r.steps}</p>",
                     f"<p>closest words: {close}</p>"]
            promotes = getattr(r, "static_promotes", None)
            if isinstance(promotes, (list, np.ndarray)):  # the unit's weights, read with no forward pass
                detects = getattr(r, "static_detects", None)
                parts.append("<p>static reading: promotes " + escape(", ".join(promotes)) + "; suppresses "
                             + escape(", ".join(r.static_suppresses))
                             + ("; detects " + escape(", ".join(detects)) if isinstance(detects, (list, np.ndarray))
                                else "") + "</p>")
            text = getattr(r, "text", None)
            if isinstance(text, str):  # input=tokens: the searched text, beside the best corpus sentence
                best = None
                if examples is not None and "target_id" in examples:
                    sent = of_type(examples[examples.target_id == r.target_id], "sentence")
                    best = sent.sort_values("activation", ascending=False).head(1)
                corpus = (f"; best corpus sentence <i>{escape(best.text.iloc[0])}</i> ({best.activation.iloc[0]:.3f})"
                          if best is not None and len(best) else "")
                parts.insert(0, f"<p>searched text <b>{escape(text)}</b> ({r.objective:.3f}){corpus}</p>")
            if curves is not None:
                c = curves[curves.target_id == r.target_id]
                if len(c):
                    parts.append(chart({"objective": (list(c.step), list(c.objective))},
                                       f"{name}", "step", "activation"))
            if examples is not None and "target_id" in examples:
                ex = examples[examples.target_id == r.target_id].groupby("kind", sort=False).head(3)
                cols = [c for c in ("kind", "rank", "activation", "anchor_token", "text", "drop", "replaced",
                                    "substitutes_from") if c in ex]
                if len(ex):
                    parts.append("<p>dataset examples</p>" + table(ex[cols].to_dict("records"), cols))
            layer = "" if r.layer is None or r.layer != r.layer else int(r.layer)
            text = " ".join([name, r.most_activating_word, *r.closest_words[:10], *list(r.sites)[:20]]).lower()
            out.append(f'<details class="atlas" data-layer="{layer}" data-text="{escape(text)}">'
                       f"<summary>{escape(run_name(p))} · {escape(name)}</summary>{''.join(parts)}</details>")
    if not out:
        return '<p class="note">No targets.</p>'
    layers = sorted({int(v) for v in targets.layer.dropna()}) if "layer" in targets else []
    options = "".join(f'<option value="{v}">layer {v}</option>' for v in layers)
    controls = ('<div class="filter"><label>layer <select id="atlas-layer"><option value="">all</option>'
                f'{options}</select></label> <label>search <input id="atlas-search" type="search" '
                'placeholder="word, site or target word"></label> <span id="atlas-count"></span></div>')
    return controls + "".join(out)


def section_concepts(targets: pd.DataFrame) -> str:
    """Probe-selected targets scored against their concept, and correlation clusters."""
    parts = []
    if "concept_closest_share" in targets and targets.concept_closest_share.notna().any():
        d = targets[targets.concept_closest_share.notna()]
        cols = ["run", "target", "most_activating_word", "concept_maw", "concept_closest_share"]
        if "concept_text_share" in d and d.concept_text_share.notna().any():
            cols += ["text", "concept_text_share"]
        rows = [{"run": run_name(r.run), "target": target_label(r), **{c: getattr(r, c, None) for c in cols[2:]}}
                for r in d.itertuples()]
        parts.append("<p>Probe-selected targets (target=probe): is the textualization the probe's concept? "
                     "concept_maw: the most activating word is a concept word; the shares: of the closest words "
                     "and of the searched text's tokens.</p>" + table(rows, cols, "concepts-table"))
    clusters = of_table(targets, "clusters")
    if len(clusters):
        rows = [{"run": run_name(r.run), "cluster": int(r.target_id), "units": int(r.k),
                 "layers": " ".join(sorted({s.split(".")[1] for s in r.sites}, key=int)),
                 "most_activating_word": r.most_activating_word, "closest_words": ", ".join(r.closest_words[:8])}
                for r in clusters.itertuples()]
        parts.append("<p>Correlation clusters (target=clusters): units that fire together over the corpus, each "
                     "textualized as a group.</p>"
                     + table(rows, ["run", "cluster", "units", "layers", "most_activating_word", "closest_words"],
                             "clusters-table"))
    return "".join(parts) or '<p class="note">No probe-selected or cluster targets.</p>'


def section_frontier(runs: pd.DataFrame, per_run: int = 12) -> str:
    """input=tokens with several fluency weights: per target, activation against fluency, one
    point per weight, labelled with its weight and text."""
    out = []
    for p in runs.path:
        frontier = secondary(lambda p=p: read_frontier(p), Path(p) / "frontier.parquet")
        if frontier is None or frontier.fluency_weight.nunique() < 2:
            continue
        labels = {int(r.target_id): target_label(r) for r in read_targets(p).itertuples()}
        frontier = frontier[np.isfinite(frontier.objective.astype(float)) & np.isfinite(frontier.fluency.astype(float))]
        source = frontier.fluency_source.iloc[0]
        for tid, f in list(frontier.groupby("target_id"))[:per_run]:
            f = f.sort_values("fluency_weight")
            out.append(chart({"frontier": (list(f.fluency), list(f.objective))},
                             f"{run_name(p)} · {labels.get(int(tid), tid)}", f"fluency ({source}, nats/token)",
                             "activation", mark="scatter", chart_id=f"frontier-{run_key(p)}-{tid}",
                             labels={"frontier": [f"w={w:g}: {t}" for w, t in zip(f.fluency_weight, f.text,
                                                                                    strict=True)]}))
    if not out:
        return '<p class="note">No run searched at several fluency weights (search.fluency_weights).</p>'
    return "".join(out)


def build_report(paths: list[str], out: str | Path = "report.html", words: int = 3000,
                 atlas_per_run: int = 50, extra: list[tuple[str, str]] | None = None) -> Path:
    """`extra`: (heading, html) sections to put first (ft.compare's table)."""
    from ft.rundir.results import run_paths

    DAMAGED.clear()
    targets, runs = load_runs(run_paths(paths))
    if runs.empty:
        raise SystemExit(f"error: no run directories under {paths}")
    name_runs([str(p) for p in runs.path])
    runs_json = runs.replace({np.nan: None}).to_json(orient="records")
    # dated by its newest run's results, not the clock: a report made again of the same runs is the same file
    from ft.rundir.results import TARGETS

    stamps = [(Path(p) / TARGETS).stat().st_mtime for p in runs.path if (Path(p) / TARGETS).exists()]
    newest = max(stamps) if stamps else time.time()
    body = [f"<h1>ft report</h1><p>{len(runs)} runs, {len(targets)} targets · results of "
            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(newest))}</p>",
            '<pre id="js-errors"></pre>',
            *[part for heading, html in extra or [] for part in (f"<h2>{escape(heading)}</h2>", html)],
            "<h2>Runs compared</h2>", section_compare(runs),
            "<h2>Table 1: single neurons</h2>", section_table1(targets, runs),
            "<h2>Figures 2-4: per layer</h2>", section_layers(targets),
            "<h2>Table 2: closest words of sample neurons</h2>", section_table2(targets),
            "<h2>Neuron groups</h2>", section_groups(targets),
            "<h2>Figure 5: PCA</h2>", section_pca(runs, words),
            "<h2>Activation curves</h2>", section_curves(runs),
            "<h2>Fluency frontier: activation against fluency, per target</h2>", section_frontier(runs),
            "<h2>Concepts and clusters</h2>", section_concepts(targets),
            "<h2>Atlas: per target</h2>", section_atlas(targets, runs, atlas_per_run)]
    if DAMAGED:  # after the sections, which found them: named at the top, the rest reported
        body.insert(2, '<p class="note" id="damaged">Left out, damaged or unreadable: '
                    + "; ".join(escape(d) for d in DAMAGED) + "</p>")
    html = (f"<!doctype html><html><head><meta charset='utf-8'><title>ft report</title><style>{CSS}</style></head>"
            f"<body>{''.join(body)}<script type='application/json' id='runs-data'>{runs_json}</script>"
            f"<script>{JS}</script></body></html>")
    out = Path(out)
    atomic_write(out, lambda p: p.write_text(html))
    return out


def unwritable(out: Path) -> str | None:
    """Why `out` cannot be written (checked before the work), or None."""
    import errno
    import os

    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        return "is a folder"
    if not folder.is_dir():
        return f"the folder {folder} does not exist"
    probe = folder / f".{out.name}.{os.getpid()}.probe"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return os.strerror(e.errno or errno.EACCES)
    return None
