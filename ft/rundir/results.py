"""The run directory: config.yaml, targets.parquet, inputs.safetensors, summary.json.

Every file is written under a temporary name and renamed into place, so a crash never
leaves a half-written file under a final name.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from ft.core.errors import ConfigError
from ft.core.files import atomic_write, discard, fsync_file
from ft.core.integrity import (
    COMMIT,
    MANIFEST,
    RunFileError,
    commit,
    pid_alive,
    read_manifest,
    remove_stale_temps,
    save_tensors,
    storage_error,
    strict_summary,
    temp_name,
    verify,
)
from ft.data.directions import RUN_FILE, DirectionSet

CONFIG, TARGETS, INPUTS, SUMMARY = "config.yaml", "targets.parquet", "inputs.safetensors", "summary.json"
CURVES = "curves.parquet"
FRONTIER = "frontier.parquet"  # input=tokens: per target and fluency weight, its best text
DIRECTIONS = RUN_FILE  # directions.safetensors: the directions a run's objectives read
# written after a run from its committed results (ft.examples): outside the manifest, so they go
# whenever other results are committed (or retired by a start over), before the new ones appear
DERIVED = ("examples.parquet", "examples_summary.json")
log = logging.getLogger("ft")


def write_config(run_dir: Path, cfg: DictConfig, fresh: bool = False) -> None:
    """config.yaml; in a run directory with results, committed with its manifest entry as one set,
    so the record never disagrees with the file. A resumed run keeps the results the manifest
    lists; a `fresh` start (ckpt_path=none, or nothing to resume from) retires them: its manifest
    lists the config alone and the old result files go, so nothing reads results of other settings
    beside this config (until this run commits its own)."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    run_dir = Path(run_dir)
    old = read_manifest(run_dir)
    if fresh:
        retire_derived(run_dir)
    if old is None:
        atomic_write(run_dir / CONFIG, lambda p: p.write_text(text))
        return
    # not a merge: the commit's journal removes the old manifest's other files with it
    write_files(run_dir, {CONFIG: lambda p: p.write_text(text)}, merge=not fresh)


RESULT_FILES = (CONFIG, CURVES, INPUTS, TARGETS, SUMMARY)


def write_run(
    run_dir: str | Path,
    cfg: DictConfig,
    targets: pd.DataFrame,
    tensors: dict[str, torch.Tensor],
    summary: dict[str, float],
    curves: pd.DataFrame | None = None,
    directions: DirectionSet | None = None,
    frontier: pd.DataFrame | None = None,
    record: dict | None = None,
) -> Path:
    """All result files of a run or none (`write_files`); `record`: what made them (the step
    reached, ...), kept in the manifest."""
    run_dir = Path(run_dir)
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    summary_text = json.dumps(strict_summary(summary), indent=1, allow_nan=False)
    writers: dict[str, Callable[[Path], None]] = {
        CONFIG: lambda p: p.write_text(config_text),
        INPUTS: lambda p: save_tensors(tensors, p),
        TARGETS: lambda p: targets.to_parquet(p, index=False),
        SUMMARY: lambda p: p.write_text(summary_text),
    }
    if curves is not None:
        writers[CURVES] = lambda p: curves.to_parquet(p, index=False)
    if frontier is not None:
        writers[FRONTIER] = lambda p: frontier.to_parquet(p, index=False)
    if directions is not None:  # the run's own copy: its objectives rebuild without the original file
        writers[DIRECTIONS] = directions.save
    retire_derived(run_dir)  # before the commit: a crash leaves the old results without them, never the new with them
    return write_files(run_dir, writers, record=record)


def retire_derived(run_dir: Path) -> None:
    """Remove the files made from the run's results after it (`DERIVED`): they describe results
    about to be replaced."""
    for name in DERIVED:
        path = Path(run_dir) / name
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise storage_error(path, e) from None


def write_files(run_dir: str | Path, writers: dict[str, Callable[[Path], None]], merge: bool = False,
                record: dict | None = None) -> Path:
    """Write every file of `writers` (name -> write(path)) or none, with the manifest: each to a
    temporary file first; when every one is on disk they are committed as one set
    (`ft.core.integrity.commit`: a journal, then the renames), so a crash at any point leaves the old
    results or the new ones. `merge`: the other files the manifest lists stay in it; `record`:
    what the manifest says about the run (`ft.core.integrity.read_run_record`)."""
    run_dir = Path(run_dir)
    staged: dict[str, Path] = {}
    current = run_dir / next(iter(writers))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(run_dir)
        for name, write in writers.items():
            current = run_dir / name
            staged[name] = temp_name(current)
            write(staged[name])
            fsync_file(staged[name])
        current = run_dir / MANIFEST
        commit(run_dir, staged, merge=merge, record=record)
    except (OSError, RunFileError) as e:  # (RunFileError: another writer's commit or a damaged manifest in the way)
        if isinstance(e, RunFileError) or not (run_dir / COMMIT).exists():  # not committed: the old results stand
            for tmp in [*staged.values(), temp_name(run_dir / MANIFEST)]:
                discard(tmp)
        if isinstance(e, RunFileError):
            raise
        raise storage_error(current, e) from None
    return run_dir


def _read(run_dir: str | Path, name: str, read: Callable[[Path], object]) -> object:
    path = verify(run_dir, name)
    try:
        return read(path)
    except RunFileError:
        raise
    except Exception as e:  # parquet, safetensors, yaml and json each raise their own types
        raise RunFileError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def target_label(row: object) -> str:
    """What a reader knows a target by: the run's `label` column (`ft.targets.unit_label`), or for
    runs written before it, what the row's own columns say: an SAE latent (`latent`), a class logit
    (`logit.N` and its class name), a group's word, a cluster (`k` units and no word or
    expression), a direction's name, an expression, a site."""
    label, spec = getattr(row, "label", None), getattr(row, "spec", None)
    logit = isinstance(spec, str) and spec.startswith("logit.")
    if isinstance(label, str) and label and (not logit or label.startswith("logit")):
        return label  # (older runs wrote a logit's class name alone in `label`)
    word, latent, k = getattr(row, "target_word", None), getattr(row, "latent", None), getattr(row, "k", None)
    if isinstance(spec, str) and latent is not None and latent == latent:
        return f"{spec}:sae.{int(latent)}"
    if logit and isinstance(label, str) and label:
        return f"{spec} ({label})"
    if isinstance(word, str):
        return f"{word} ({row.selection} k={row.k})"
    if spec is None and k is not None and k == k and len(row.sites) > 1:
        return f"cluster {row.target_id} ({int(k)} units)"
    name = getattr(row, "direction_name", None)
    if isinstance(name, str) and isinstance(spec, str):
        return f"{spec.split('@')[0]}@{name}"
    if isinstance(spec, str):
        return spec
    sites = list(row.sites)
    return str(sites[0]) + (f" +{len(sites) - 1}" if len(sites) > 1 else "")


def read_targets(run_dir: str | Path) -> pd.DataFrame:
    return _read(run_dir, TARGETS, pd.read_parquet)


def read_curves(run_dir: str | Path) -> pd.DataFrame | None:
    """Long table (step, target_id, objective), or None for runs written without curves."""
    if not (Path(run_dir) / CURVES).exists() and CURVES not in (read_manifest(Path(run_dir)) or {}):
        return None
    return _read(run_dir, CURVES, pd.read_parquet)


def read_frontier(run_dir: str | Path) -> pd.DataFrame | None:
    """input=tokens: (target_id, fluency_weight, token_ids, text, objective, fluency,
    fluency_source), one row per target and weight; None for runs without one."""
    if not (Path(run_dir) / FRONTIER).exists() and FRONTIER not in (read_manifest(Path(run_dir)) or {}):
        return None
    return _read(run_dir, FRONTIER, pd.read_parquet)


def read_probe(run_dir: str | Path) -> pd.DataFrame:
    """An ft.probe run's probe.parquet, checked against its manifest."""
    return _read(run_dir, "probe.parquet", pd.read_parquet)


def read_inputs(run_dir: str | Path) -> dict[str, torch.Tensor]:
    return _read(run_dir, INPUTS, lambda p: load_file(str(p)))


def read_directions(run_dir: str | Path) -> DirectionSet | None:
    """The run's copy of its directions file, or None for a run that used none."""
    if not (Path(run_dir) / DIRECTIONS).exists() and DIRECTIONS not in (read_manifest(Path(run_dir)) or {}):
        return None
    from ft.data.directions import load_directions

    return _read(run_dir, DIRECTIONS, load_directions)


def read_config(run_dir: str | Path) -> DictConfig:
    return _read(run_dir, CONFIG, OmegaConf.load)


def read_summary(run_dir: str | Path) -> dict[str, float]:
    return _read(run_dir, SUMMARY, lambda p: json.loads(p.read_text()))


def run_paths(paths: str | Path | Iterable[str | Path]) -> list[str | Path]:
    """`load_runs`'s argument as a list: one str or Path is one path or glob (never its characters);
    anything else must be an iterable of them."""
    if isinstance(paths, (str, Path)):
        return [paths]
    if isinstance(paths, bytes) or not isinstance(paths, Iterable):
        raise ConfigError(f"paths={paths!r}; valid: a run directory or glob (str or Path), or a list of them")
    out = list(paths)
    bad = [p for p in out if not isinstance(p, (str, Path))]
    if bad:
        raise ConfigError(f"paths: {bad[0]!r} is a {type(bad[0]).__name__}; valid: run directories or globs "
                          "(str or Path)")
    return out


def find_runs(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Run directories under the given paths (a run dir itself, or any folder above runs)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: set[Path] = set()
    for p in map(Path, paths):
        if (p / TARGETS).exists() or (p / CONFIG).exists() and p.name != ".hydra":
            found.add(p)
        elif p.is_dir():  # unfinished runs (a config, no results) count too: readers skip them by name
            found.update(t.parent for name in (TARGETS, CONFIG) for t in p.rglob(name)
                         if not any(part.startswith(".") for part in t.relative_to(p).parts[:-1]))
    return sorted(found)


def expand(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Paths and globs -> run directories (sweep and shard folders included). A single str or
    Path is one path or glob (never its characters)."""
    import glob

    if isinstance(paths, (str, Path)):
        paths = [paths]
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


class Runs(NamedTuple):
    """`load_runs`'s answer: unpacks as `targets, runs = load_runs(...)`, or read by name."""

    targets: pd.DataFrame  # every target of every run, with a `run` column
    runs: pd.DataFrame  # one row per run: flattened config and summary, `run` and `path`


def load_runs(paths: str | Path | Iterable[str | Path]) -> Runs:
    """All targets of all runs (with a `run` column) and one row per run (config + summary).

    Inputs stay on disk; `read_inputs(runs.path[i])` loads them on demand.
    """
    dirs = expand(paths)
    runs, tables = [], []
    for d in dirs:
        try:  # one incomplete or damaged run is skipped, by name; the others are read
            row = run_row(d, read_config(d), read_summary(d))
            t = read_targets(d)
        except RunFileError as e:
            log.warning("skipping run %s: %s", d, e)
            continue
        row["run"], row["path"] = str(d), str(d)
        runs.append(row)
        t.insert(0, "run", str(d))
        tables.append(t)
    runs_df = pd.DataFrame(runs)
    targets_df = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return Runs(targets_df, runs_df)


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
        try:
            return self._take()
        except OSError as e:  # read-only or full: the run cannot write its directory
            raise storage_error(self.path.parent, e) from None

    def _take(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.path.parent)  # a killed run's half-written files
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = self.path.read_text().strip()
            pid, _, host = owner.partition("@")
            if host == socket.gethostname() and pid.isdigit() and _alive(int(pid)):
                from ft.core.errors import FtError

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
    return pid_alive(pid)
