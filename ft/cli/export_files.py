"""What every export shares (a new or empty output folder, staged and renamed into place; finished
runs, their labels) and the Hugging Face dataset format: one parquet table of every run's targets
with a dataset card.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

import ft
from ft.core.errors import ConfigError
from ft.core.integrity import StorageError, storage_error
from ft.rundir.results import read_config, read_inputs, read_summary, read_targets, target_label

DATA_FILE = "data/train-00000-of-00001.parquet"


HF_COLUMNS = ("target_id", "kind", "sites", "spec", "layer", "latent", "sae_path", "sae_post", "target_word", "k",
              "selection", "objective", "most_activating_word", "most_activating_word_activation", "closest_words",
              "closest_cos", "snapped_tokens", "snapped_activation", "text", "token_ids", "fluency",
              "static_promotes", "static_suppresses", "static_detects", "steps", "converged", "diverged")


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"-o {out}: exists and is not an empty folder; valid: a new or empty folder")
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigError(f"-o {out}: {above} is a file; valid: a new or empty folder")


def finished(run_dir: Path) -> Path:
    if not (run_dir / "targets.parquet").exists():
        raise ConfigError(f"{run_dir} is not a finished ft run (no targets.parquet)")
    return run_dir


def run_label(run_dir: Path) -> str:
    cfg = read_config(run_dir)
    from ft.cli.hydra_conf import dirname

    return f"{dirname(cfg.get('run_name'), cfg.experiment_name)}-{run_dir.name}"


def run_labels(runs: Iterable[Path]) -> dict[Path, str]:
    """A distinct name per run: `run_label`, and where two runs share it (the same `run_name` and
    folder name in two places), each of them followed by 6 hex of its absolute path's hash."""
    runs = list(runs)
    base = {r: run_label(r) for r in runs}
    shared = {name for name in base.values() if list(base.values()).count(name) > 1}
    return {r: f"{n}-{hashlib.sha256(str(r.resolve()).encode()).hexdigest()[:6]}" if n in shared else n
            for r, n in base.items()}


def distinct(runs: Iterable[Path]) -> list[Path]:
    """Each run once, however many paths (links, `..`) lead to it."""
    seen: dict[Path, Path] = {}
    for r in runs:
        seen.setdefault(Path(r).resolve(), Path(r))
    return list(seen.values())


def label_of(row: object) -> str:
    """The row's `label` column where the run wrote one, else what `target_label` makes of it."""
    label = getattr(row, "label", None)
    return label if isinstance(label, str) and label else target_label(row)


# -- hf ---------------------------------------------------------------------------------------------
def hf_rows(run_dir: Path, name: str) -> pd.DataFrame:
    """One row per target: what it is, what it became, its metrics, its optimized input."""
    cfg, targets, inputs = read_config(run_dir), read_targets(run_dir), read_inputs(run_dir)
    df = targets[[c for c in HF_COLUMNS if c in targets]].copy()
    df.insert(0, "label", [label_of(r) for r in targets.itertuples()])
    df.insert(0, "model", str(cfg.model.name_or_path))
    df.insert(0, "run", name)
    df["input_kind"], df["input_length"] = str(cfg.input.kind), int(cfg.input.length)
    for tensor in ("embeds", "analysis"):
        if tensor in inputs and len(inputs[tensor]) == len(df):
            df[tensor] = [inputs[tensor][i].float().tolist() for i in range(len(df))]  # rows as in the table
    return df


def card(rows: pd.DataFrame, labels: dict[Path, str]) -> str:
    """A dataset card: YAML metadata (data files, models, configs, metrics, ft version) and how the
    data was made."""
    import yaml

    configs = {name: json.loads(json.dumps(dict(read_config(r)), default=str)) for r, name in labels.items()}
    meta = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILE}]}],
        "tags": ["interpretability", "feature-textualization", "activation-maximization", "ft"],
        "pretty_name": "ft textualizations",
        "size_categories": ["n<1K" if len(rows) < 1000 else "1K<n<10K" if len(rows) < 10_000 else "10K<n<100K"],
        "ft_version": ft.__version__,
        "models": sorted(set(rows.model)),
        "runs": [{"name": name, "experiment": str(read_config(r).experiment_name),
                  "metrics": {k: v for k, v in read_summary(r).items() if isinstance(v, (int, float))}}
                 for r, name in labels.items()],
    }
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    body = [f"# ft textualizations ({len(rows)} targets, {len(labels)} runs)", "",
            "Each row is one target (a neuron, a group, an expression over units, a direction, an SAE latent ...)"
            " of a frozen BERT-family encoder, and the input that ft (feature textualization: activation "
            "maximization) optimized for it: `embeds` (the optimized input embeddings, [length, width]), the "
            "nearest words (`closest_words`, `closest_cos`), the most activating vocabulary word, and, for "
            "token search, the searched `text`. `label` names the unit; SAE rows carry `latent`, `sae_path` "
            "(the SAE the run read) and `sae_post` (the latent's post-activation).", "",
            f"Made with ft {ft.__version__} (`python -m ft.export ... --format hf`). Each run's full config:", ""]
    for name, c in configs.items():
        body += [f"## {name}", "", "```yaml", yaml.safe_dump(c, sort_keys=False).rstrip(), "```", ""]
    body += ["Load it with `datasets.load_dataset(\"parquet\", data_dir=...)` or `datasets.load_dataset(path)`."]
    return f"---\n{head}---\n\n" + "\n".join(body) + "\n"


def export_hf(runs: list[Path], out: Path) -> Path:
    runs = distinct(runs)
    with staging(out) as tmp:
        labels = run_labels(runs)
        rows = pd.concat([hf_rows(r, labels[r]) for r in runs], ignore_index=True)
        (tmp / "data").mkdir()
        rows.to_parquet(tmp / DATA_FILE, index=False)
        (tmp / "README.md").write_text(card(rows, labels))
    return out


# -- writing ----------------------------------------------------------------------------------------
@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A temporary sibling folder of `out` to write into, moved into place when the block ends:
    nothing half-written. Made first, so that a place that cannot be written fails before any
    work; a failed write (read-only, full) removes what it made (the folders above `out` it
    created included) and raises StorageError naming `out` and the cause."""
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    tmp: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        yield tmp
        if out.exists():
            out.rmdir()  # empty (check_out)
        tmp.rename(out)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for p in made:
            try:
                p.rmdir()
            except OSError:
                pass
        if isinstance(e, OSError) and not isinstance(e, StorageError):
            raise storage_error(out, e) from None
        raise


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


def jsonl(lines: list[dict]) -> bytes:
    """JSON lines, each with the keys of the first in the same order (the importer's columns)."""
    keys = list(lines[0]) if lines else []
    for line in lines:
        if list(line) != keys:
            raise ConfigError(f"a line has keys {sorted(line)}; valid: the first line's {sorted(keys)}")
    text = "".join(json.dumps(line, allow_nan=False, ensure_ascii=False, separators=(",", ":")) + "\n"
                   for line in lines)
    return text.encode()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)  # no timestamp: the same export, the same bytes
