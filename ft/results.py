"""The run directory: config.yaml, targets.parquet, inputs.safetensors, summary.json.

Every file is written under a temporary name and renamed into place, so a crash never
leaves a half-written file under a final name.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

CONFIG, TARGETS, INPUTS, SUMMARY = "config.yaml", "targets.parquet", "inputs.safetensors", "summary.json"
CURVES = "curves.parquet"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) and rename tmp to path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_config(run_dir: Path, cfg: DictConfig) -> None:
    text = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write(Path(run_dir) / CONFIG, lambda p: p.write_text(text))


def write_run(
    run_dir: str | Path,
    cfg: DictConfig,
    targets: pd.DataFrame,
    tensors: dict[str, torch.Tensor],
    summary: dict[str, float],
    curves: pd.DataFrame | None = None,
) -> Path:
    run_dir = Path(run_dir)
    write_config(run_dir, cfg)
    if curves is not None:
        atomic_write(run_dir / CURVES, lambda p: curves.to_parquet(p, index=False))
    atomic_write(run_dir / INPUTS, lambda p: save_file(tensors, str(p)))
    atomic_write(run_dir / TARGETS, lambda p: targets.to_parquet(p, index=False))
    atomic_write(run_dir / SUMMARY, lambda p: p.write_text(json.dumps(summary, indent=1)))
    return run_dir


def read_targets(run_dir: str | Path) -> pd.DataFrame:
    return pd.read_parquet(Path(run_dir) / TARGETS)


def read_curves(run_dir: str | Path) -> pd.DataFrame | None:
    """Long table (step, target_id, objective), or None for runs written without curves."""
    path = Path(run_dir) / CURVES
    return pd.read_parquet(path) if path.exists() else None


def read_inputs(run_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / INPUTS))


def read_config(run_dir: str | Path) -> DictConfig:
    return OmegaConf.load(Path(run_dir) / CONFIG)


def read_summary(run_dir: str | Path) -> dict[str, float]:
    return json.loads((Path(run_dir) / SUMMARY).read_text())


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories under the given paths (a run dir itself, or any folder above runs)."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if (p / TARGETS).exists():
            found.add(p)
        elif p.is_dir():
            found.update(t.parent for t in p.rglob(TARGETS))
    return sorted(found)


def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Paths and globs -> run directories (sweep and shard folders included)."""
    import glob

    found: list[str | Path] = []
    for p in paths:
        matches = glob.glob(str(p), recursive=True)
        found += matches or [p]
    return find_runs(found)


def _short(target: str | None) -> str | None:
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else None


def run_row(run_dir: Path, cfg: DictConfig, summary: dict[str, float]) -> dict:
    """One row of the runs table: the config columns people compare, then the summary."""
    c = OmegaConf.to_container(cfg, resolve=True)
    row = {
        "run": run_dir.name if run_dir.parent == run_dir else str(run_dir),
        "experiment": c.get("experiment_name"),
        "model": c.get("model", {}).get("name_or_path"),
        "target_kind": c.get("target", {}).get("kind"),
        "k": c.get("target", {}).get("k") if c.get("target", {}).get("kind") == "group" else None,
        "selection": c.get("target", {}).get("selection") if c.get("target", {}).get("kind") == "group" else None,
        "input": c.get("input", {}).get("kind"),
        "optimizer": _short(c.get("optim", {}).get("_target_")),
        "lr": c.get("optim", {}).get("lr"),
        "scheduler": _short((c.get("scheduler") or {}).get("_target_")),
        "reg_norm": c.get("reg", {}).get("norm"),
        "reg_word": c.get("reg", {}).get("word"),
        "max_steps": c.get("trainer", {}).get("max_steps"),
        "precision": c.get("trainer", {}).get("precision"),
        "seed": c.get("seed"),
        "shard": c.get("target", {}).get("shard"),
    }
    row.update(summary)
    return row


def load_runs(paths: Iterable[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All targets of all runs (with a `run` column) and one row per run (config + summary).

    Inputs stay on disk; `read_inputs(runs.path[i])` loads them on demand.
    """
    dirs = expand(paths)
    runs, tables = [], []
    for d in dirs:
        row = run_row(d, read_config(d), read_summary(d))
        row["run"], row["path"] = str(d), str(d)
        runs.append(row)
        t = read_targets(d)
        t.insert(0, "run", str(d))
        tables.append(t)
    runs_df = pd.DataFrame(runs)
    targets_df = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return targets_df, runs_df


class RunDirBusyError(ValueError):
    """Another live process writes to this run directory."""


class RunLock:
    """`run_dir/.lock` (pid@host): concurrent runs never share a run directory.

    A lock left by a killed process (its pid is gone) is taken over, so resuming works.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self.mine = f"{os.getpid()}@{socket.gethostname()}"

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = self.path.read_text().strip()
            pid, _, host = owner.partition("@")
            if host == socket.gethostname() and pid.isdigit() and _alive(int(pid)):
                from ft.errors import FtError

                raise FtError(f"run directory {self.path.parent} is in use by process {owner}; "
                              "use another hydra.run.dir") from None
            self.path.unlink(missing_ok=True)  # stale: its process is gone
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, self.mine.encode())
        os.close(fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.path.exists() and self.path.read_text().strip() == self.mine:
            self.path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
