"""Resuming a run: which checkpoint a run continues, what a resume may change (and its log),
the inputs a run reads and keeps (`ft.rundir.kept`), and whether a run directory already holds a
finished run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ft.cli.build import swap_search
from ft.core.errors import ConfigError, FtError
from ft.core.integrity import RunFileError
from ft.core.moved import new_name
from ft.data.corpus import corpus_path
from ft.engine.state import CheckpointRecord
from ft.rundir.kept import fingerprint
from ft.rundir.results import CONFIG, TARGETS, atomic_write
from ft.rundir.tracking import flat_config
from ft.targets import (
    Target,
)
from ft.targets.registry import canonical, unit_kind

log = logging.getLogger("ft")


# What a resumed run may change: how long it runs, where and how it reports, how it slices the
# work. Anything else (the model, targets, input, optimizer, regularizers, seeds, precision,
# convergence rule) must equal the run directory's config.yaml.
RESUME_MAY_CHANGE = ("trainer.max_steps", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
                     "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
                     "logger", "callbacks", "print_rows", "log_level", "cache", "run_name", "tags", "ckpt_path",
                     "examples_after_run", "optimized_metric",
                     "experiment_name", "engine.checkpoint_every_n_steps", "engine.chunk_size",
                     "engine.memory_budget_mb", "engine.fast_forward", "engine.stop_when_converged",
                     "engine.sweep_budget_mb", "hydra")


# keys a run directory made before them lacks
RESUME_DEFAULTS = {"engine.keep": "last", "log_level": "info", "examples_after_run": False, "search.topk": 256,
                   "search.candidates": 256, "search.population": 1, "search.patience": 40,
                   "search.fluency_weights": [0], "search.fluency_model": "auto"}


RESUME_LOG = "resume_log.jsonl"


IDENTITY = ("model.name_or_path", "input.kind", "target.kind")  # named first when a checkpoint is foreign


def same_setting(key: str, old: object, new: object) -> bool:
    """Two spellings of one setting: a `_target_` at the module path it moved to (ft.core.moved),
    a kind by its older name (`target.kind=clusters` is `cluster`)."""
    if key.endswith("_target_") and isinstance(old, str) and isinstance(new, str):
        module, _, name = old.rpartition(".")
        return f"{new_name(module) or module}.{name}" == new
    if key == "target.kind" and isinstance(old, str) and isinstance(new, str):
        return canonical(old) == canonical(new)
    return False


def resume_changes(old: DictConfig | dict, new: DictConfig, path: Path, maker: str | None = None) -> dict[str, list]:
    """The allowed changes of a resumed run ({key: [old, new]}); a change of any other key is a
    ConfigError naming the key, both values and (`maker`) what made the checkpoint."""
    a, b = flat_config(old), flat_config(new)
    changed = {}
    for key in sorted(set(a) | set(b), key=lambda k: (k not in IDENTITY, k)):  # what a run is, first
        va, vb = a.get(key, RESUME_DEFAULTS.get(key)), b.get(key, RESUME_DEFAULTS.get(key))
        if va == vb or same_setting(key, va, vb):
            continue
        if key.startswith(RESUME_MAY_CHANGE):
            changed[key] = [va, vb]
            continue
        by = f" (made by {maker})" if maker else ""
        raise ConfigError(f"cannot resume {path}{by}: it was made with {key}={va!r}, this run has {key}={vb!r}; "
                          f"valid: {key}={va!r}, a new run directory (hydra.run.dir=...), or ckpt_path=none "
                          "to start over")
    return changed


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's dict (tensors memory-mapped); a truncated or damaged file is a one-line
    error naming it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError, OSError, EOFError, pickle errors...
        cause = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ConfigError(f"checkpoint {path} is unreadable ({cause}): it was cut short or damaged; valid: "
                          f"delete it to start over, or ckpt_path=none") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"checkpoint {path} is not a Lightning checkpoint (a {type(ckpt).__name__}); valid: a "
                          "checkpoints/last.ckpt that ft wrote, or ckpt_path=none")
    return ckpt


def read_checkpoint_step(path: Path) -> int:
    """The checkpoint's global step; a truncated or damaged file is a one-line error naming it."""
    return int(read_checkpoint(path).get("global_step", 0))


def made_by(cfg: DictConfig | dict) -> str:
    """One line naming what a run is: its input, its targets and its model."""
    c = flat_config(cfg)
    return (f"input={c.get('input.kind')} target={c.get('target.kind')} model={c.get('model.name_or_path')} "
            f"seed={c.get('seed')}")


def checkpoint_origin(path: Path, ckpt: dict) -> tuple[dict | DictConfig, dict[str, dict], str]:
    """What made a checkpoint: its settings, its input fingerprints and a line naming it, from the
    record stored inside it (`ft.engine.state.CheckpointRecord`), else from the config.yaml of the run
    directory it lies in (checkpoints written before the record). Neither: a ConfigError."""
    from ft.rundir.kept import index

    record = ckpt.get(CheckpointRecord.KEY)
    if isinstance(record, dict) and isinstance(record.get("settings"), dict):
        return record["settings"], dict(record.get("inputs") or {}), str(record.get("made_by"))
    origin = path.parent.parent
    if (origin / CONFIG).exists():
        old = OmegaConf.load(origin / CONFIG)
        return old, index(origin), made_by(old)
    raise ConfigError(f"checkpoint {path} records no settings and lies outside a run directory (no "
                      f"{origin / CONFIG}): ft cannot check what made it; valid: a checkpoint in its run directory "
                      "(RUN/checkpoints/last.ckpt), or ckpt_path=none to start over")


def refuse_changed_inputs(path: Path, recorded: dict[str, dict], digests: dict[str, str],
                          sources: dict[str, Path]) -> None:
    """A ConfigError naming the first input file whose content differs from the one the
    checkpoint's run started with (same path or not)."""
    for role, digest in digests.items():
        old = (recorded.get(role) or {}).get("sha256")
        if old and old != digest:
            raise ConfigError(f"cannot resume from {path}: {role} {sources[role]} is not the one that run started "
                              f"with (sha256 {digest[:12]}, it used {old[:12]}); valid: restore that file, a new run "
                              "directory (hydra.run.dir=...), or ckpt_path=none to start over")


def checkpoint_to_resume(cfg: DictConfig, run_dir: Path, digests: dict[str, str] | None = None,
                         sources: dict[str, Path] | None = None) -> tuple[Path | None, dict]:
    """`ckpt_path`: auto (last.ckpt when the run directory has one), last (required), none, or a path.

    Returns the checkpoint and what to record in resume_log.jsonl ({at_step, changed: {key: [old,
    new]}, from: a checkpoint of another run directory}; {} when nothing is worth recording).
    Refuses, before anything is written, a checkpoint that cannot be read, one made with other
    settings (its own record, wherever it lies), and one whose run read other input files
    (`digests`: role -> sha256 of the files this run reads, `sources`: their paths).
    """
    last = run_dir / "checkpoints" / "last.ckpt"
    choice = str(cfg.get("ckpt_path", "auto"))
    if choice == "none":
        return None, {}
    path = last if choice in ("auto", "last") else Path(choice)
    if not path.exists():
        if choice == "auto":
            return None, {}
        raise ConfigError(f"ckpt_path={choice!r}: {path} does not exist; valid: auto, last, none, a .ckpt file")
    ckpt = read_checkpoint(path)
    settings, inputs, maker = checkpoint_origin(path, ckpt)
    changed = resume_changes(settings, cfg, path, maker)
    refuse_changed_inputs(path, inputs, digests or {}, sources or {})
    entry: dict = {"at_step": int(ckpt.get("global_step", 0))}
    if changed:
        entry["changed"] = changed
    if path.resolve().parent.parent != run_dir.resolve():
        entry["from"] = str(path.resolve())
    return path, entry if len(entry) > 1 else {}


def record_resume(run_dir: Path, entry: dict) -> None:
    """Append what a resume changed to resume_log.jsonl (config.yaml then holds the new values)."""
    import json
    import time

    path = run_dir / RESUME_LOG
    old = path.read_text() if path.exists() else ""
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **entry}, default=str)
    atomic_write(path, lambda p: p.write_text(old + line + "\n"))


def finished_step(cfg: DictConfig, run_dir: Path) -> int | None:
    """The step a finished run in `run_dir` reached when this run would add nothing to it (its
    intact results reached `trainer.max_steps`, or every row stopped before it); else None."""
    from ft.core.integrity import read_manifest, read_run_record, verify

    if str(cfg.get("ckpt_path", "auto")) not in ("auto", "last"):
        return None
    try:
        files = read_manifest(run_dir)
        if files is None or TARGETS not in files:  # no results, or retired by a start-over
            return None
        for name in files:
            verify(run_dir, name)
        record = read_run_record(run_dir)
    except RunFileError:
        return None  # damaged results: the run resumes and writes them again
    if record is None:  # results from before ft recorded the step: the checkpoint's
        last = run_dir / "checkpoints" / "last.ckpt"
        step = read_checkpoint_step(last) if last.exists() else None
        return step if step is not None and step >= cfg.trainer.max_steps else None
    step = int(record["step"])
    if step >= cfg.trainer.max_steps or record.get("stopped_early") and cfg.engine.stop_when_converged:
        return step
    return None


def input_sources(cfg: DictConfig) -> dict[str, Path]:
    """The local files and folders this run reads (role -> path), which it keeps (`ft.rundir.kept`): the
    model folder (by fingerprint), a directions file, an SAE folder, a probe run's table and
    concept file, a fluency model or corpus, a clusters corpus. Hub names are not files."""
    from ft.model.encoder import local_folder

    t, out = cfg.target, {}
    try:
        folder = local_folder(cfg.model.name_or_path)  # a hub name: the cache's snapshot it resolves to
        if folder is not None:
            out["model"] = folder
    except FtError:
        pass  # the packaged model's package is missing: load_encoder says so
    if t.get("file"):
        out["directions"] = Path(str(t.file))
    out |= unit_kind(t.kind).sources(t)  # an SAE folder, a probe run's table and concept, a corpus
    if swap_search(cfg):
        spec = str(cfg.search.get("fluency_model", "auto"))
        if spec.startswith("bigram:"):
            out["fluency_corpus"] = corpus_path(spec.split(":", 1)[1])
        elif spec not in ("auto", "self", "bigram"):
            out["fluency_model"] = Path(spec)
    return {role: p.expanduser() for role, p in out.items() if p.expanduser().exists()}


def resumed_demo_sae(cfg: DictConfig, run_dir: Path, resume_from: Path | None) -> dict | None:
    """A resumed demo-SAE run: the demo SAE its checkpoint's run kept ({"copy", "sha256"}), else None."""
    from ft.rundir.kept import index, kept

    if resume_from is None or "sae" not in unit_kind(cfg.target.kind).made_inputs or cfg.target.get("path"):
        return None
    recorded = (checkpoint_origin(resume_from, read_checkpoint(resume_from))[1].get("sae") or {}).get("sha256")
    own = resume_from.resolve().parent.parent == run_dir.resolve()
    copy = kept(run_dir, "sae") if own else None
    if copy is not None and recorded and fingerprint(copy) != recorded:
        copy = None  # kept for another attempt: the cache's demo SAE is checked against the record instead
    source = (index(run_dir).get("sae") or {}).get("source") if copy is not None else None
    return {"copy": copy, "sha256": recorded, "source": source}


def keep_inputs(run_dir: Path, cfg: DictConfig, sources: dict[str, Path], digests: dict[str, str],
                targets: list[Target], fresh: bool) -> dict[str, dict]:
    """Keep every input in the run (`ft.rundir.kept`), the demo SAE too; a `fresh` start forgets the inputs
    an earlier run in this directory kept and this one does not read. Returns the kept index."""
    from ft.rundir.kept import forget, index, keep

    for role, path in sources.items():
        keep(run_dir, role, path, digest=digests[role])
    kind = unit_kind(cfg.target.kind)
    for role, path in kind.made(targets).items():  # what the kind made for this run (the demo SAE)
        if role not in sources:
            keep(run_dir, role, path)
    if fresh:
        forget(run_dir, set(index(run_dir)) - set(sources) - set(kind.made_inputs))
    return index(run_dir)
