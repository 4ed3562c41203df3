"""Checks on the command line of `python -m ft.train` and `python -m ft.probe`, before Hydra
creates a run directory.

Hydra writes `.hydra/` before the job starts and exits 1 with a multi-line message on its own
composition errors. `preflight(argv, command)` composes the same config with Hydra's compose API,
runs `ft.cli.schema`'s checks on it, then those that need the model: its config and files (tokenizer,
whole weights), its shapes (the modules built on the meta device, no weights: sites, heads,
layers, per_layer, k, a directions file's width) and a fluency model's vocabulary. Any problem is
one line on stderr and exit code 2, with nothing written. Under `--multirun` every combination of
the swept values is checked before any job starts (beyond MAX_VARIANTS combinations, every value
once). `nothing_left_if_refused` removes (or, in a run directory that existed, restores) what
Hydra wrote for a job that the job's own later checks refused; `writable_place` is the check on an
output path that ft.static and ft.merge share; `storage_line` the one line of a failed write.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ft.cli.schema import check_config, check_model, check_probe_config, check_probe_model
from ft.core.errors import FtError
from ft.inputs import find_input_kind
from ft.model.encoder import check_tokenizer_fits, load_model_config

MULTIRUN_FLAGS = ("-m", "--multirun")
MAX_VARIANTS = 256  # combinations checked one by one (about 0.1 s each: Hydra composes each)


class PreflightError(FtError):
    """The command line cannot run; the message is the one line printed."""


def config_dir() -> str:
    from importlib.resources import files

    return str(files("ft.configs"))


def check_choices(overrides: list[str]) -> None:
    """An unknown config-group option (experiment=nope, input=logits) names the valid ones."""
    root = Path(config_dir())
    for arg in overrides:
        key, eq, value = arg.lstrip("+~").partition("=")
        if not eq or "." in key or "/" in key or not (root / key).is_dir():
            continue
        options = sorted(p.stem for p in (root / key).glob("*.yaml"))
        if value not in options and value != "null":
            raise PreflightError(f"{key}={value!r} is not an option; valid: {', '.join(options)}")


def one_line(e: Exception) -> str:
    """Hydra/OmegaConf messages span lines (the key, a hint, the object type): keep the first two."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("object_type")]
    return " ".join(lines[:3]) or type(e).__name__


def parse(overrides: list[str]) -> list:
    """Hydra's parse of each override; one that does not parse is named."""
    parser, parsed = OverridesParser.create(), []
    for arg in overrides:
        try:
            parsed += parser.parse_overrides([arg])
        except HydraException as e:
            raise PreflightError(f"{arg!r} does not parse: {one_line(e)}") from None
    return parsed


def sweep_values(o: object) -> list[str]:
    """The values of a swept override to check: each choice or range value; an interval's two ends
    (an optimizing sweeper such as Optuna draws inside it)."""
    from hydra.core.override_parser.types import IntervalSweep

    value = o.value()
    if isinstance(value, IntervalSweep):
        return [str(value.start), str(value.end)]
    return list(o.sweep_string_iterator())


def variants(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The command lines to check: as given, or under --multirun one per value of each swept key."""
    parsed = parse(overrides)
    if not multirun:
        return [overrides]
    choices: list[list[str]] = []
    for o in parsed:
        if o.is_sweep_override():
            prefix = {"ADD": "+", "DELETE": "~", "FORCE_ADD": "++"}.get(o.type.name, "")
            choices.append([f"{prefix}{o.get_key_element()}={v}" for v in sweep_values(o)])
        else:
            choices.append([o.input_line])
    total = math.prod(len(c) for c in choices)
    if total <= MAX_VARIANTS:  # every combination: two values fine alone may not be together
        return [list(line) for line in itertools.product(*choices)]
    first = [c[0] for c in choices]  # too many to compose each: every value once, with the others' first
    out = [first]
    for i, c in enumerate(choices):
        out += [first[:i] + [v] + first[i + 1:] for v in c[1:]]
    return out


def check_train(cfg: DictConfig) -> None:
    """`python -m ft.train`'s checks: the schemas, then those that need the model's config."""
    check_config(cfg)
    config = model_config(cfg.model.name_or_path, cfg.model.trust_remote_code)
    check_model(cfg, config)
    tokenizer_fits(cfg.model.name_or_path, cfg.model.trust_remote_code)
    check_fluency_model(cfg)
    model = skeleton(cfg.model.name_or_path, cfg.model.trust_remote_code)
    if model is not None:
        try:
            check_target_on(OmegaConf.to_container(cfg.target, resolve=True), model)
        except FtError:
            raise
        except Exception:  # noqa: BLE001 - a family whose shapes do not read on the meta device: the run checks
            pass


def check_fluency_model(cfg: DictConfig) -> None:
    """input=tokens with `search.fluency_model=DIR`: a directory whose weights are whole and whose
    vocabulary is the model's, token for token (its head is checked when the run loads it)."""
    spec = str((cfg.get("search") or {}).get("fluency_model") or "auto")
    kind = find_input_kind(cfg.input.get("kind"))
    if kind is None or not kind.swap_search or spec in ("auto", "self", "bigram") or spec.startswith("bigram:"):
        return
    from ft.measure.fluency import check_same_vocabulary
    from ft.model.encoder import check_weights_file

    if not Path(spec).is_dir():
        raise PreflightError(f"search.fluency_model={spec!r}: no such directory; valid: auto, self, bigram, "
                             "bigram:CORPUS, or a local masked-LM directory of the same vocabulary")
    check_weights_file(spec, spec, "search.fluency_model")
    check_same_vocabulary(spec, tokenizer_of(cfg.model.name_or_path, cfg.model.trust_remote_code),
                          cfg.model.trust_remote_code)


@functools.lru_cache(maxsize=4)
def tokenizer_of(name: str, trust_remote_code: bool) -> object:
    from transformers import AutoTokenizer

    from ft.model.encoder import resolve

    return AutoTokenizer.from_pretrained(resolve(name), trust_remote_code=trust_remote_code)


@functools.lru_cache(maxsize=4)
def skeleton(name: str, trust_remote_code: bool) -> torch.nn.Module | None:
    """The model's modules with no weights (on the meta device, built from its config in well under
    a second even for large models): the shapes a site, layer or k is checked against. None where
    it cannot be built that way (the run then checks on the loaded model)."""
    from transformers import AutoModel

    try:
        with torch.device("meta"):
            return AutoModel.from_config(model_config(name, trust_remote_code), trust_remote_code=trust_remote_code,
                                         attn_implementation="eager")
    except Exception:  # noqa: BLE001 - an exotic model: its run's own checks still apply
        return None


def check_target_on(t: dict, model: torch.nn.Module) -> None:
    """The target's sites, layers, per_layer and k against the model's shapes (its kind's
    `check_model`): a sweep value out of range is refused before any job (not after the jobs
    before it ran)."""
    from ft.targets.registry import unit_kind

    unit_kind(t.get("kind")).check_model(t, model)


def check_probe(cfg: DictConfig) -> None:
    """`python -m ft.probe`'s checks: the schemas, the model, its layers."""
    check_probe_config(cfg)
    check_probe_model(cfg, model_config(cfg.model.name_or_path, cfg.model.trust_remote_code))


@functools.lru_cache(maxsize=8)
def model_config(name: str, trust_remote_code: bool) -> object:
    """The model's config (read once per command line, however many sweep variants)."""
    return load_model_config(name, trust_remote_code)


@functools.lru_cache(maxsize=8)
def tokenizer_fits(name: str, trust_remote_code: bool) -> None:
    """The model's tokenizer has no more tokens than its embedding rows (once per command line)."""
    check_tokenizer_fits(name, model_config(name, trust_remote_code))


CHECKS: dict[str, Callable[[DictConfig], None]] = {"train": check_train, "probe": check_probe}


def check_command_line(overrides: list[str], command: str = "train") -> None:
    """Compose `overrides` as `python -m ft.<command>` would and check every value."""
    job = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    check_choices(job)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(command, overrides=job)
        CHECKS[command](cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise PreflightError(one_line(e)) from None
    finally:
        GlobalHydra.instance().clear()


def check_writable(overrides: list[str], multirun: bool) -> None:
    """The folder the run directory goes in can be written (Hydra writes `.hydra/` there first)."""
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    given = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith(key)]
    target = Path(given[-1]) if given else Path.cwd() / "logs"
    writable_place(target, "the run directory", "a writable hydra.run.dir=...", folder=True)


class OneLineParser(argparse.ArgumentParser):
    """argparse with ft's error form: one line on stderr naming the bad value and where the valid
    ones are (`--help`), exit 2; argparse's own prints the usage block first."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())
        if "valid:" not in message:  # the command's own checks (p.error) already say what is valid
            message += f"; valid: see {self.prog} --help"
        self.exit(2, f"error: {message}\n")


def refuse_inside(out: Path, inputs: list[Path], what: str, valid: str) -> None:
    """PreflightError when the output `out` is one of the `inputs` (run directories, a model
    folder) or lies inside one: writing there would replace or add to what the command reads."""
    target = Path(out).resolve()
    for folder in inputs:
        folder = Path(folder).resolve()
        if target == folder or target.is_relative_to(folder):
            raise PreflightError(f"{what} {out} is inside the input {folder}: writing there would change what "
                                 f"this command reads; valid: {valid} outside it")


def refuse_in_run(out: Path, what: str, valid: str) -> None:
    """PreflightError when the output `out` lies inside a run directory (a folder above it holds a
    run's targets.parquet or config.yaml): a command's output never replaces or joins a run's files."""
    from ft.rundir.results import CONFIG, TARGETS

    target = Path(out).resolve()
    for folder in target.parents:
        if folder.name != ".hydra" and ((folder / TARGETS).exists() or (folder / CONFIG).exists()):
            raise PreflightError(f"{what} {out} is inside the run directory {folder}: writing there would change "
                                 f"the run; valid: {valid} outside it")


def writable_place(path: Path, what: str, valid: str, folder: bool) -> None:
    """`path` (a folder if `folder`, else a file) can be created or written: PreflightError naming
    the place in the way (a file where a folder must be, a read-only file system, no permission)."""
    import os

    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise PreflightError(f"cannot write {what} {path}: it is a file; valid: {valid}")
    if not folder and path.is_dir():
        raise PreflightError(f"cannot write {what} {path}: it is a folder; valid: {valid}")
    existing = path if folder else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PreflightError(f"cannot write {what} {path}: {existing} is a file, not a folder; valid: {valid}")
    if os.access(existing, os.W_OK) and not os.statvfs(existing).f_flag & os.ST_RDONLY:
        return
    ro = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    raise PreflightError(f"cannot write {what} {path}: {existing} is "
                         f"{'on a read-only file system' if ro else 'not writable (permission denied)'}; "
                         f"valid: {valid}")


def preflight(argv: list[str], command: str = "train") -> None:
    """Exit 2 with one line on stderr if `argv` cannot run; return if it can. Hydra's own flags
    (--help, --cfg, --config-dir, ...) are left to Hydra, and the job checks its config again."""
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in MULTIRUN_FLAGS for f in flags):
        return
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        for line in variants(overrides, multirun=bool(flags)):
            check_command_line(line, command)
        check_writable(overrides, multirun=bool(flags))
    except FtError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, TypeError) as e:  # a value no check foresaw: still one line, never a traceback
        print(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}", file=sys.stderr)
        sys.exit(2)


def storage_line(e: OSError, run_dir: Path | str) -> str:
    """One line for a write that failed during a run: the path and the cause, and where the cause
    is the place (a full disk, a read-only file system) the run directory and what to do. A
    library's temporary file (W&B stages its tables in /tmp) is not the place to fix."""
    import errno
    import os

    from ft.core.integrity import StorageError

    message = str(e) if isinstance(e, StorageError) else f"cannot write {e.filename or 'a file'}: {e.strerror or e}"
    code = e.errno or next((c for c in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
                            if os.strerror(c) in message), None)  # a StorageError keeps the cause in words
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"{message}; the run directory {run_dir} is on a full disk: free space there (or choose another "
                "hydra.run.dir=...) and run the same command again, it resumes")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"{message}; the run directory {run_dir} cannot be written: choose a writable hydra.run.dir=... "
                "and run the command again")
    return message


def __getattr__(name: str) -> object:  # a name that moved to another module still imports (ft.core.moved)
    from ft.core.moved import moved_attribute

    return moved_attribute(__name__, name)
