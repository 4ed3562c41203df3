"""Nothing left when a command is refused: what Hydra's output folders held before a command, and how a
refused command's folders and files are taken back (never a run file written since the start).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from ft.cli.preflight import MULTIRUN_FLAGS, config_dir

# -- a job refused after Hydra wrote its run directory leaves nothing -------------------------------
HYDRA_FILES = (".hydra", "multirun.yaml")  # with `<job>.log`: what Hydra writes before the job runs


DEPTH = 4  # how deep under the output root a new run directory is looked for


@dataclass
class Before:
    """The output root of a command line as it was before Hydra ran: the run directory given
    (`kept`: the bytes of Hydra's files in it, so that a refused re-run restores them), or the
    static part of the configured pattern (`dirs`: the folders that existed under it)."""

    root: Path
    given: bool
    existed: bool
    dirs: set[Path]
    entries: set[str]
    kept: dict[Path, bytes]
    ancestor: Path  # the nearest folder that existed (empty folders are removed up to it)
    multirun: bool = False  # the root is a sweep folder: earlier jobs' run directories in it stay
    keys: frozenset[str] = frozenset()  # the job overrides' keys: a new folder is this command's if its match
    since_ns: int = 0  # when this was taken: a file of the run's own written after it is work, never undone


def output_root(overrides: list[str], command: str, multirun: bool) -> tuple[Path, bool]:
    """(the run directory given with hydra.run.dir / hydra.sweep.dir, True), or (the part of the
    configured pattern before its first interpolation, False)."""

    key = "sweep" if multirun else "run"
    given = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith(f"hydra.{key}.dir=")]
    if given:
        return Path(given[-1]).absolute(), True
    try:
        pattern = str(OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / f"{command}.yaml"))
                      ["hydra"][key]["dir"])
    except (OSError, KeyError, TypeError):
        pattern = "outputs/"
    static = pattern.split("${", 1)[0]
    return (Path.cwd() / static.rpartition("/")[0]).absolute(), False


def hydra_file(path: Path, root: Path) -> bool:
    rel = path.relative_to(root)
    return rel.parts[0] in HYDRA_FILES or (len(rel.parts) == 1 and path.suffix == ".log")


def folders(root: Path, depth: int = DEPTH) -> set[Path]:
    """The folders under `root`, `depth` levels deep (`.hydra` folders left out)."""
    out: set[Path] = set()
    level = [root] if root.is_dir() else []
    for _ in range(depth):
        level = [p for d in level for p in d.iterdir() if p.is_dir() and not p.is_symlink() and p.name != ".hydra"]
        out.update(level)
    return out


def take(overrides: list[str], command: str, multirun: bool) -> Before:
    root, given = output_root(overrides, command, multirun)
    existed = root.is_dir()
    entries, kept = set(), {}
    if given and existed:
        entries = {p.name for p in root.iterdir()}
        for p in [*root.glob(".hydra/*"), *root.glob("*.log"), root / "multirun.yaml"]:
            if p.is_file():
                kept[p] = p.read_bytes()
    ancestor = next(d for d in [root, *root.parents] if d.exists())
    dirs = set() if given and not multirun else folders(root)
    return Before(root, given, existed, dirs, entries, kept, ancestor, multirun, override_keys(overrides),
                  time.time_ns())


def override_keys(overrides: list[str]) -> frozenset[str]:
    """The keys of the job's overrides (Hydra's own left out), as `.hydra/overrides.yaml` has them."""
    keys = (o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o)
    return frozenset(k for k in keys if not k.startswith(("hydra.", "hydra/")))


def made_by(folder: Path, keys: frozenset[str]) -> bool:
    """`folder`'s Hydra files are of a job with these override keys (a concurrent command started
    in the same second with other overrides is not ours to clean up)."""

    recorded = folder / ".hydra" / "overrides.yaml"
    if not recorded.is_file():
        return True
    try:
        return override_keys([str(o) for o in OmegaConf.load(recorded)]) == keys
    except Exception:  # noqa: BLE001 - unreadable: not provably ours
        return False


def only_hydra_files(folder: Path) -> bool:
    """Nothing in `folder` (or its sub-folders' run directories) but what Hydra writes."""
    for p in folder.rglob("*"):
        if p.is_file() and not any(hydra_file(p, d) for d in [folder, *p.parents] if d.is_relative_to(folder)
                                   and p.is_relative_to(d) and d != p):
            return False
    return True


def remove_empty_up_to(folder: Path, stop: Path) -> None:
    """`folder` and its parents below `stop`, each only if empty."""
    for d in [folder, *folder.parents]:
        if d == stop or not d.is_relative_to(stop):
            return
        try:
            d.rmdir()
        except OSError:
            return


def run_files_written(root: Path, since_ns: int) -> bool:
    """Anything but Hydra's own files written under `root` since `since_ns`: results, a checkpoint,
    kept inputs (this job's work before a late refusal, or a concurrent job's)."""
    return any(p.is_file() and not p.is_symlink() and not hydra_file(p, root) and p.stat().st_mtime_ns >= since_ns
               for p in root.rglob("*"))


def undo(before: Before) -> None:
    """Put the output root back as it was before a refused job: a run directory given restores
    Hydra's files and drops what the job added; otherwise a new folder holding only Hydra's files
    (the refused job's run directory) is removed. A run directory where run files were written
    since (a refusal after the fit, such as an unknown `optimized_metric`; another job's results)
    is left as it is: undoing never removes work."""
    import shutil

    root = before.root
    if before.given and not before.multirun and root.is_dir() and run_files_written(root, before.since_ns):
        return
    if before.given and before.existed:
        for p in [] if before.multirun else root.iterdir():  # a sweep's new job folders: below
            if p.name not in before.entries:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        for p in [*root.glob(".hydra/*"), *root.glob("*.log"), root / "multirun.yaml"]:
            if p.is_file() and p not in before.kept:
                p.unlink()
        for p, data in before.kept.items():
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(data)
        if not before.multirun:
            return
    elif before.given and not before.multirun:  # a new run directory: everything in it is the refused job's
        shutil.rmtree(root, ignore_errors=True)
        remove_empty_up_to(root.parent, before.ancestor)
        return
    new = sorted(folders(root) - before.dirs, key=lambda d: len(d.parts))
    for d in new:  # the refused job's run directory; never an earlier job's, which holds its results
        if d.is_dir() and only_hydra_files(d) and all(made_by(r, before.keys) for r in [d, *d.rglob("*")]
                                                      if (r / ".hydra").is_dir()):
            shutil.rmtree(d, ignore_errors=True)
            remove_empty_up_to(d.parent, before.ancestor)
    if before.multirun and not before.existed and root.is_dir() and only_hydra_files(root):
        shutil.rmtree(root, ignore_errors=True)  # a new sweep folder with no job left in it
        remove_empty_up_to(root.parent, before.ancestor)


class NothingToDo(SystemExit):
    """A run with nothing to do (a finished run re-run): exit 0, and the run directory stays as it
    was, byte for byte (Hydra's `.hydra/` files and the log included)."""

    def __init__(self) -> None:
        super().__init__(0)


@contextmanager
def nothing_left_if_refused(argv: list[str], command: str = "train") -> Iterator[None]:
    """Around Hydra's main: a job that exits 2 (its own checks refused it after Hydra created its
    run directory), or that had nothing to do (`NothingToDo`), leaves the output folder as it found it."""
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in MULTIRUN_FLAGS for f in flags):
        yield
        return
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        before = take(overrides, command, bool(flags))
    except OSError:
        before = None
    try:
        yield
    except SystemExit as e:
        if (e.code == 2 or isinstance(e, NothingToDo)) and before is not None:
            try:
                undo(before)
            except OSError as err:  # the refusal's own line stays the message
                print(f"note: could not remove {before.root}: {err.strerror or err}", file=sys.stderr)
        raise
