"""The report's pieces: its style and script, run names and labels, number formats, HTML tables,
regressions, the W&B link of a run, the analysis vectors a PCA plots.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
from scipy import stats

from ft.core.errors import FtError
from ft.rundir.results import (
    CONFIG,
    read_config,
)
from ft.targets.registry import unit_kind

_NAMES: dict[str, str] = {}  # path -> short unique folder name (stable: chart ids use it)
_LABELS: dict[str, str] = {}  # path -> what the page calls the run
DAMAGED: list[str] = []  # "<file>: <cause>" for each secondary file a section had to leave out
T = TypeVar("T")


CONFIG_COLUMNS = ["experiment", "model", "target_kind", "k", "selection", "input", "optimizer", "lr",
                  "scheduler", "reg_norm", "reg_word", "max_steps", "precision", "seed", "shard"]


CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1250px;color:#222}
table{border-collapse:collapse;margin:8px 0 20px;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px}
th{background:#f2f2f2;cursor:pointer}td.n{text-align:right;font-variant-numeric:tabular-nums}
.t{font-size:13px;font-weight:600}.k{font-size:10px;fill:#444}.legend{font-size:10px}.note{color:#777;font-style:italic}
details{margin:4px 0}summary{cursor:pointer}.figs{display:flex;flex-wrap:wrap;gap:12px}
#js-errors{color:#b00}.scroll{overflow-x:auto;max-width:100%}#runs-table th{white-space:normal;max-width:9em}
#runs-table td:first-child{white-space:nowrap}.filter{margin:6px 0 10px}"""


JS = r"""
window.__errors=[];window.addEventListener('error',e=>{window.__errors.push(String(e.message));
document.getElementById('js-errors').textContent=window.__errors.join('\n');});
document.querySelectorAll('table.sortable th').forEach((th,i)=>th.addEventListener('click',()=>{
 const tb=th.closest('table').tBodies[0],rows=[...tb.rows],asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
 const v=r=>{const t=r.cells[i].dataset.v??r.cells[i].textContent;const n=parseFloat(t);return isNaN(n)?t:n;};
 rows.sort((a,b)=>{const x=v(a),y=v(b);return (x>y?1:x<y?-1:0)*(asc?1:-1);});rows.forEach(r=>tb.appendChild(r));}));
const RUNS=JSON.parse(document.getElementById('runs-data').textContent);
const PALETTE=['#1f77b4','#ff7f0e','#2ca02c','#d62728','#9467bd','#8c564b','#e377c2','#7f7f7f','#bcbd22','#17becf'];
function drawCompare(){const xs=document.getElementById('cmp-x').value,ys=document.getElementById('cmp-y').value,
 gs=document.getElementById('cmp-g').value;
 const svg=document.getElementById('compare-svg');while(svg.firstChild)svg.removeChild(svg.firstChild);
 const pts=RUNS.filter(r=>r[ys]!==null&&r[ys]!==undefined);const ns='http://www.w3.org/2000/svg';
 const cats=[...new Set(pts.map(r=>String(r[xs])))].sort();const num=pts.every(r=>typeof r[xs]==='number');
 const xv=r=>num?r[xs]:cats.indexOf(String(r[xs]));const X=pts.map(xv),Y=pts.map(r=>r[ys]);
 const lo=a=>Math.min(...a),hi=a=>Math.max(...a);const sx=v=>60+(v-lo(X))/((hi(X)-lo(X))||1)*470,
 sy=v=>280-(v-lo(Y))/((hi(Y)-lo(Y))||1)*250;
 const txt=(x,y,s,a)=>{const t=document.createElementNS(ns,'text');t.setAttribute('x',x);t.setAttribute('y',y);
  t.setAttribute('class','k');if(a)t.setAttribute('text-anchor',a);t.textContent=s;svg.appendChild(t);};
 const grp=r=>gs?String(r[gs]):'all';const groups=[...new Set(pts.map(grp))].sort();
 const col=g=>PALETTE[groups.indexOf(g)%PALETTE.length];
 groups.forEach((g,gi)=>{const mine=pts.map((r,i)=>[r,i]).filter(([r])=>grp(r)===g);
  const byx={};mine.forEach(([r,i])=>{(byx[X[i]]=byx[X[i]]||[]).push(Y[i]);});
  const line=Object.keys(byx).map(Number).sort((a,b)=>a-b).map(x=>[x,byx[x].reduce((a,b)=>a+b,0)/byx[x].length]);
  if(line.length>1){const pl=document.createElementNS(ns,'polyline');pl.setAttribute('fill','none');
   pl.setAttribute('stroke',col(g));pl.setAttribute('stroke-width','1.5');pl.setAttribute('class','cmp-line');
   pl.setAttribute('data-group',g);pl.setAttribute('points',line.map(([x,y])=>sx(x)+','+sy(y)).join(' '));
   svg.appendChild(pl);}
  if(gs){const t=document.createElementNS(ns,'text');t.setAttribute('x',535);t.setAttribute('y',40+14*gi);
   t.setAttribute('class','legend');t.setAttribute('fill',col(g));t.setAttribute('text-anchor','end');
   t.textContent=gs+'='+g;svg.appendChild(t);}});
 pts.forEach((r,i)=>{const c=document.createElementNS(ns,'circle');c.setAttribute('cx',sx(X[i]));
  c.setAttribute('cy',sy(Y[i]));c.setAttribute('r',4);c.setAttribute('fill',col(grp(r)));
  const t=document.createElementNS(ns,'title');t.textContent=r.run+': '+Y[i];c.appendChild(t);svg.appendChild(c);});
 if(pts.length){txt(60,300,num?lo(X).toPrecision(3):cats[0]);txt(530,300,num?hi(X).toPrecision(3):cats[cats.length-1],'end');
  txt(55,285,lo(Y).toPrecision(3),'end');txt(55,35,hi(Y).toPrecision(3),'end');}
 txt(295,316,xs,'middle');txt(295,14,ys+' by '+xs+(gs?', one line per '+gs:'')+' ('+pts.length+' runs)','middle');}
['cmp-x','cmp-y','cmp-g'].forEach(id=>document.getElementById(id).addEventListener('change',drawCompare));drawCompare();
function filterAtlas(){const L=document.getElementById('atlas-layer'),S=document.getElementById('atlas-search');
 if(!L)return;const q=S.value.trim().toLowerCase();let n=0;const all=document.querySelectorAll('details.atlas');
 all.forEach(d=>{const ok=(!L.value||d.dataset.layer===L.value)&&(!q||d.dataset.text.includes(q));
  d.style.display=ok?'':'none';n+=ok;});document.getElementById('atlas-count').textContent=n+' of '+all.length;}
const H=new URLSearchParams(location.hash.slice(1));  // report.html#layer=3&q=bank opens filtered
if(document.getElementById('atlas-layer')){if(H.has('layer'))document.getElementById('atlas-layer').value=H.get('layer');
 if(H.has('q'))document.getElementById('atlas-search').value=H.get('q');document.getElementById('atlas-layer').addEventListener('change',filterAtlas);
 document.getElementById('atlas-search').addEventListener('input',filterAtlas);filterAtlas();}
"""


def secondary(read: Callable[[], T], path: Path | str) -> T | None:
    """`read()` of one run's secondary file (curves, frontier, examples, inputs); a damaged one is
    noted by name (`DAMAGED`, the report's warnings) and left out, and the report goes on."""
    try:
        return read()
    except (FtError, OSError, ValueError, KeyError, RuntimeError) as e:  # RunFileError, ArrowInvalid, ...
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        DAMAGED.append(f"{path}: {cause}" if str(path) not in cause else cause)
        return None


def finite_rows(x: np.ndarray) -> np.ndarray:
    """[n, d] -> the rows without inf or NaN (a diverged target's vector)."""
    return x[np.isfinite(x).all(1)] if x.ndim == 2 else x[np.isfinite(x)]


def name_runs(paths: list[str]) -> None:
    """Short, unique folder names: the folder name, with as many parent folders as it takes to
    tell runs apart (two sweeps both have a run `000`); and the runs' labels (`label_runs`)."""
    _NAMES.clear()
    parts = {p: Path(p).resolve().parts for p in paths}
    for p, pp in parts.items():
        for n in range(1, len(pp) + 1):
            name = "/".join(pp[-n:])
            if sum("/".join(q[-n:]) == name for q in parts.values()) == 1:
                break
        _NAMES[p] = name
    _LABELS.clear()
    _LABELS.update(label_runs(paths))


def flat(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def user_set_run_name(path: str) -> str | None:
    """`run_name` when the user gave it (on the command line, in an experiment, or through the
    API); None when ft.train made it up from the overrides (Hydra's overrides.yaml tells)."""
    from omegaconf import OmegaConf

    if not (Path(path) / CONFIG).exists():
        return None
    cfg = read_config(path)
    name = cfg.get("run_name")
    overrides = Path(path) / ".hydra" / "overrides.yaml"
    if name and overrides.exists():
        given = [str(o) for o in OmegaConf.load(overrides)]
        return name if any(o.lstrip("+").startswith("run_name=") for o in given) else None
    return name or None


def label_runs(paths: list[str]) -> dict[str, str]:
    """Each run's label: its run_name if the user set one, else the config values that tell the
    runs apart (`optim.lr=0.1 seed=2`), else the experiment; the folder name where two collide."""
    from omegaconf import OmegaConf

    configs = {p: flat(OmegaConf.to_container(read_config(p), resolve=False)) if (Path(p) / CONFIG).exists()
               else {} for p in paths}
    skip = ("run_name", "hydra", "ckpt_path", "cache", "print_rows", "log_level", "target.seed")
    labels = {}
    for exp in dict.fromkeys(c.get("experiment_name", "") for c in configs.values()):
        group = {p: c for p, c in configs.items() if c.get("experiment_name", "") == exp}
        keys = sorted({k for c in group.values() for k in c if not k.startswith(skip)})
        differ = [k for k in keys if len({c.get(k) for c in group.values()}) > 1]  # within the experiment
        for p, c in group.items():
            labels[p] = user_set_run_name(p) or " ".join([exp, *(f"{k}={c.get(k)}" for k in differ)]).strip() \
                or Path(p).name
    counts = pd.Series(list(labels.values())).value_counts()
    return {p: f"{lab} ({_NAMES.get(p, Path(p).name)})" if counts[lab] > 1 else lab for p, lab in labels.items()}


def run_name(path: str) -> str:
    """The run's label on the page (see label_runs)."""
    return _LABELS.get(str(path)) or _NAMES.get(str(path), Path(path).name)


def run_key(path: str) -> str:
    """The run's short folder name, for element ids."""
    return _NAMES.get(str(path), Path(path).name)


def fmt(v: object, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "—"
    if isinstance(v, float | np.floating):
        return f"{v:.{digits}f}"
    return escape(str(v))


def table(rows: list[dict], cols: list[str], table_id: str = "", keys: dict | None = None) -> str:
    """A sortable HTML table; `keys[(row_index, col)]` adds data-key attributes tests read."""
    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    body = []
    for i, r in enumerate(rows):
        cells = []
        for c in cols:
            v = r.get(c)
            num = isinstance(v, int | float | np.number) and not isinstance(v, bool)
            attrs = f' class="n" data-v="{v}"' if num else ""
            if keys and (i, c) in keys:
                attrs += f' data-key="{escape(keys[(i, c)])}"'
            cells.append(f"<td{attrs}>{fmt(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def ms(s: pd.Series) -> str:
    return f"{s.mean():.3f} (σ={s.std(ddof=0):.3f})"


def regression(x: pd.Series, y: pd.Series, key: str = "") -> str:
    """Least-squares slope of y on x with its t statistic and two-sided p value (exact values in
    the span's data attributes, under data-key `key`)."""
    if x.nunique() < 2 or len(x) < 3:
        return "regression: needs at least two layers"
    r = stats.linregress(x.astype(float), y.astype(float))
    t = r.slope / r.stderr if r.stderr else float("inf")
    return (f'<span class="reg" data-key="{escape(key)}" data-slope="{r.slope}" data-t="{t}" '
            f'data-p="{r.pvalue}">β={r.slope:.3f}, t({len(x) - 2})={t:.2f}, p={r.pvalue:.2g}</span>')


def of_table(targets: pd.DataFrame, table: str) -> pd.DataFrame:
    """The targets whose kind's report section is `table` (`UnitKind.report_table`: neurons, groups,
    clusters)."""
    if "kind" not in targets:
        return targets.iloc[:0]
    return targets[targets["kind"].map(lambda k: unit_kind(k).report_table).eq(table)]


def word_vectors_for(run_dir: str, n: int, seed: int = 0) -> np.ndarray | None:
    """A sample of vocabulary analysis vectors from the run's model (None if it cannot load)."""
    try:
        from ft.model.encoder import load_encoder
        from ft.model.vocab import Vocabulary, analysis_vectors

        cfg = read_config(run_dir)
        enc = load_encoder(cfg.model.name_or_path)
        vecs = analysis_vectors(enc, Vocabulary.from_tokenizer(enc.tokenizer), int(cfg.position))
    except Exception:  # the model may be unavailable offline: the section says so
        return None
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(vecs), size=min(n, len(vecs)), replace=False)
    return vecs[idx].numpy()


WANDB_RUN_URL = re.compile(r"https?://[^\s\"']+/runs/[A-Za-z0-9]+")


def wandb_url(run_dir: str) -> str | None:
    """The W&B page of a run that reached the server: the URL its W&B log printed (online runs), or,
    for an offline run that `wandb sync` uploaded (run-*.wandb.synced), built from its entity,
    project and id. None for runs that stayed offline."""
    import os

    from ft.rundir.results import read_config
    from ft.rundir.tracking import WANDB_ID

    root = Path(run_dir) / "wandb"
    for log_file in sorted(root.glob("*/logs/debug*.log")):
        m = WANDB_RUN_URL.search(log_file.read_text(errors="replace"))
        if m:
            return m.group(0)
    id_file = Path(run_dir) / WANDB_ID
    if not any(root.glob("offline-run-*/run-*.wandb.synced")) or not id_file.exists():
        return None
    w = read_config(run_dir).get("logger", {}).get("wandb") or {}
    entity = w.get("entity") or os.environ.get("WANDB_ENTITY")
    if not entity:
        return None
    base = os.environ.get("WANDB_BASE_URL", "https://wandb.ai").rstrip("/").replace("api.wandb.ai", "wandb.ai")
    return f"{base}/{entity}/{w.get('project') or 'ft'}/runs/{id_file.read_text().strip()}"
