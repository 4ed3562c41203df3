"""The run directory: config.yaml, targets.parquet, inputs.safetensors, summary.json.

Every file is written under a temporary name and renamed into place, so a crash never
leaves a half-written file under a final name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

CONFIG, TARGETS, INPUTS, SUMMARY = "config.yaml", "targets.parquet", "inputs.safetensors", "summary.json"


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
) -> Path:
    run_dir = Path(run_dir)
    write_config(run_dir, cfg)
    atomic_write(run_dir / INPUTS, lambda p: save_file(tensors, str(p)))
    atomic_write(run_dir / TARGETS, lambda p: targets.to_parquet(p, index=False))
    atomic_write(run_dir / SUMMARY, lambda p: p.write_text(json.dumps(summary, indent=1)))
    return run_dir


def read_targets(run_dir: str | Path) -> pd.DataFrame:
    return pd.read_parquet(Path(run_dir) / TARGETS)


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
