"""Integrity of what ft writes and reads back: content checksums, the run directory's manifest,
stale temporary files, strict JSON.

- Every file a run writes at its end is listed in `manifest.json` with its size and sha256; the
  manifest is written last, so it is the commit record: a run directory whose files do not match
  it is incomplete or damaged, and readers refuse the file, naming it.
- Results are committed as a set (`commit`): every file is staged under a temporary name, then
  `commit.json` (the journal: each temporary file, its final name and sha256) is written; that
  write is the commit point. The renames follow, the manifest last, and the journal is removed.
  A crash before the journal leaves the old results (and stale temporary files); a crash after
  it leaves a journal that the next reader or writer rolls forward to the new results. A
  reader never sees a mix: `read_manifest` finishes (or refuses, by name) a pending commit.
- The vocabulary cache stores the sha256 of its tensor bytes in the safetensors metadata.
- Temporary files carry their writer's pid (`.NAME.PID.tmp`); those of dead writers (a killed
  run) are removed the next time the folder is written to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import socket
from pathlib import Path

from ft.core.errors import FtError

log = logging.getLogger("ft")

MANIFEST = "manifest.json"
COMMIT = "commit.json"  # the journal of a commit in progress
# files only a commit writes (ft.rundir.results, ft.probe): one the manifest does not list is not the run's
COMMITTED_ONLY = frozenset({"config.yaml", "targets.parquet", "inputs.safetensors", "summary.json", "curves.parquet",
                            "frontier.parquet", "directions.safetensors", "probe.parquet"})
_TMP = re.compile(r"^\.?(?P<name>.+)\.(?P<pid>\d+)\.tmp$")
_warned: set[str] = set()


class RunFileError(FtError):
    """A run file is missing, damaged, or does not match the run's manifest."""


class StorageError(OSError):
    """A write failed (disk full, read-only, ...): one line naming the path and the cause."""


def storage_error(path: Path | str, e: OSError) -> StorageError:
    cause = e.strerror or str(e) or type(e).__name__
    return StorageError(f"cannot write {path}: {cause}")


def save_tensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with its I/O failures raised as the OSError they are."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        m = re.search(r"os error (\d+)", str(e))
        if m:
            code = int(m.group(1))
            raise OSError(code, os.strerror(code), str(path)) from None
        raise


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def refuse_uncommitted(run_dir: Path, path: Path) -> None:
    """A run directory without a manifest is read as one from before manifests, unless it shows a
    commit that never finished: staged files of a writer (`.NAME.PID.tmp`) beside the results, or
    kept inputs (`kept/`, written only by an ft that also writes manifests). Those are refused."""
    staged = sorted(m.group("name") for p in run_dir.iterdir() if (m := _TMP.match(p.name)))
    if staged:
        raise RunFileError(f"{path} is from a commit that never finished ({', '.join(staged[:4])} staged, no "
                           f"{MANIFEST}): its files may mix two steps; rerun the run to write them again")
    if (run_dir / "kept" / "index.json").exists() and path.name != "config.yaml":
        raise RunFileError(f"{path} has no {MANIFEST} beside it: the run's results were never committed; rerun it")


# -- the run directory's manifest ----------------------------------------------------------------
def manifest_entry(path: Path) -> dict[str, object]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def read_manifest(run_dir: Path) -> dict[str, dict] | None:
    finish_commit(Path(run_dir))
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return dict(data["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunFileError(f"{path} is damaged ({e}); the run directory cannot be trusted") from None


def read_run_record(run_dir: Path) -> dict | None:
    """What the committed results record about the run that made them (`run` in the manifest:
    the step it reached, whether it stopped before its step budget); None before ft recorded it."""
    if read_manifest(run_dir) is None:
        return None
    record = json.loads((Path(run_dir) / MANIFEST).read_text()).get("run")
    return dict(record) if isinstance(record, dict) else None


def verify(run_dir: str | Path, name: str) -> Path:
    """The path of `name` in `run_dir` after checking it against the manifest. Run directories
    written before manifests existed load with a warning."""
    run_dir = Path(run_dir)
    path = run_dir / name
    files = read_manifest(run_dir)
    if files is None:
        if not path.exists():
            raise RunFileError(f"{path} is missing: the run did not finish (no {MANIFEST})")
        refuse_uncommitted(run_dir, path)
        warn_once(str(run_dir), "%s has no %s (written before ft checked its files): its files are used "
                  "unverified", run_dir, MANIFEST)
        return path
    if name not in files:
        if not path.exists():
            raise RunFileError(f"{path} is missing")
        if name in COMMITTED_ONLY:  # a result file only a commit writes: left by another run, or put back
            raise RunFileError(f"{path} is not among the results {run_dir / MANIFEST} lists (left by another run "
                               "in this directory, or restored since): it is not this run's; rerun it")
        return path  # written after the run (ft.examples' files): not part of its record
    if not path.exists():
        raise RunFileError(f"{path} is missing: the run directory is incomplete")
    want = files[name]
    if path.stat().st_size != want["size"] or sha256_file(path) != want["sha256"]:
        raise RunFileError(f"{path} is damaged: its content does not match {MANIFEST} (sha256); "
                           "rerun it or restore the file")
    return path


def commit(run_dir: Path, staged: dict[str, Path], merge: bool = False, record: dict | None = None) -> None:
    """Rename the staged files (name -> temporary file, each flushed) into place as one set, with
    the manifest of their checksums. `merge`: the manifest keeps the other files it lists (a
    resumed run's config.yaml); otherwise result files of the old manifest that the new set lacks
    are removed. `record`: what the manifest says about the run (`read_run_record`; kept on a
    merge). A crash at any point leaves the old set or (through the journal) the new one."""
    run_dir = Path(run_dir)
    finish_commit(run_dir)
    old = read_manifest(run_dir) or {}
    if record is None and merge:
        record = read_run_record(run_dir)
    entries = {name: {"size": tmp.stat().st_size, "sha256": sha256_file(tmp)} for name, tmp in staged.items()}
    files = {**old, **entries} if merge else entries
    manifest_tmp = temp_name(run_dir / MANIFEST)
    manifest_tmp.write_text(json.dumps({"version": 1, "files": files, **({"run": record} if record else {})}, indent=1))
    _fsync(manifest_tmp)
    moves = {name: {"tmp": tmp.name, **entries[name]} for name, tmp in staged.items()}
    moves[MANIFEST] = {"tmp": manifest_tmp.name, **manifest_entry(manifest_tmp)}
    journal = {"version": 1, "pid": os.getpid(), "host": socket.gethostname(), "files": moves,
               "remove": [] if merge else sorted(set(old) - set(entries))}
    journal_tmp = temp_name(run_dir / COMMIT)
    journal_tmp.write_text(json.dumps(journal, indent=1))
    _fsync(journal_tmp)
    os.replace(journal_tmp, run_dir / COMMIT)  # the commit point
    _fsync_dir(run_dir)
    apply_commit(run_dir, journal, check=False)  # the writer's own staged files: just hashed


def apply_commit(run_dir: Path, journal: dict, check: bool = True) -> None:
    """Roll a journal forward: each staged file to its name (the manifest last), stale results
    removed, the journal deleted. A file neither staged (`check`: with its sha256) nor already in
    place is a RunFileError."""
    moves = journal["files"]
    for name in sorted(moves, key=lambda n: n == MANIFEST):
        final, tmp, want = run_dir / name, run_dir / moves[name]["tmp"], moves[name]["sha256"]
        if tmp.exists() and (not check or sha256_file(tmp) == want):
            os.replace(tmp, final)
        elif not (final.exists() and sha256_file(final) == want):
            raise RunFileError(f"{final} is missing or damaged and {run_dir / COMMIT} cannot restore it: the run's "
                               "results are incomplete; rerun it")
    for name in journal.get("remove", []):
        (run_dir / name).unlink(missing_ok=True)
    _fsync_dir(run_dir)
    (run_dir / COMMIT).unlink(missing_ok=True)


def finish_commit(run_dir: Path) -> None:
    """A commit left half-done by a killed writer is rolled forward; one whose writer still runs
    is refused by name (its files are changing)."""
    path = run_dir / COMMIT
    if not path.exists():
        return
    try:
        journal = json.loads(path.read_text())
        pid, host = int(journal["pid"]), str(journal.get("host", socket.gethostname()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunFileError(f"{path} is damaged ({type(e).__name__}): the run's results cannot be trusted; rerun it") \
            from None
    if host != socket.gethostname():  # a shared file system: whether that writer still runs is not knowable here
        raise RunFileError(f"{run_dir} is being committed by process {pid} on {host} ({COMMIT}); read it there, or "
                           f"here once that process has ended (any read on {host} completes the commit)")
    if pid != os.getpid() and pid_alive(pid):
        raise RunFileError(f"{run_dir} is being written by process {pid} ({COMMIT}); read it when that ends")
    try:
        apply_commit(run_dir, journal)
    except OSError as e:
        raise RunFileError(f"{run_dir} holds an unfinished commit ({COMMIT}) that cannot be completed here "
                           f"({e.strerror or e}); open it where it is writable, or rerun it") from None
    log.warning("%s: completed the commit a killed process left unfinished", run_dir)


def pending_temps(folder: Path) -> set[str]:
    """The temporary files a journal in `folder` still needs."""
    try:
        journal = json.loads((Path(folder) / COMMIT).read_text())
        return {m["tmp"] for m in journal["files"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- temporary files -----------------------------------------------------------------------------
def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temporary files in `folder` whose writer is no longer running; return them."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    keep = pending_temps(folder)
    for p in entries:
        m = _TMP.match(p.name)
        if p.name in keep:
            continue
        if m and int(m.group("pid")) != os.getpid() and not pid_alive(int(m.group("pid"))):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    if removed:
        log.warning("removed %d temporary file(s) left by killed writers in %s", len(removed), folder)
    return removed


# -- strict JSON ---------------------------------------------------------------------------------
def strict_summary(summary: dict[str, float]) -> dict[str, object]:
    """JSON without NaN/Infinity: a non-finite value becomes null and `notes` says which and why."""
    out: dict[str, object] = {}
    notes = []
    for k, v in summary.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
            why = "no finite values to aggregate (every target diverged or the mean is undefined)" \
                if math.isnan(v) else "the value overflowed"
            notes.append(f"{k} was {v}: {why}")
        else:
            out[k] = v
    if notes:
        out["notes"] = notes
    return out
