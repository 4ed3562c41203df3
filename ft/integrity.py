"""Integrity of what ft writes and reads back: content checksums, the run directory's manifest,
stale temporary files, strict JSON.

- Every file a run writes at its end is listed in `manifest.json` with its size and sha256; the
  manifest is written last, so it is the commit record: a run directory whose files do not match
  it is incomplete or damaged, and readers refuse the file, naming it.
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
from pathlib import Path

from ft.errors import FtError

log = logging.getLogger("ft")

MANIFEST = "manifest.json"
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


# -- the run directory's manifest ----------------------------------------------------------------
def manifest_entry(path: Path) -> dict[str, object]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def read_manifest(run_dir: Path) -> dict[str, dict] | None:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return dict(data["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunFileError(f"{path} is damaged ({e}); the run directory cannot be trusted") from None


def verify(run_dir: str | Path, name: str) -> Path:
    """The path of `name` in `run_dir` after checking it against the manifest. Run directories
    written before manifests existed load with a warning."""
    run_dir = Path(run_dir)
    path = run_dir / name
    files = read_manifest(run_dir)
    if files is None:
        if not path.exists():
            raise RunFileError(f"{path} is missing: the run did not finish (no {MANIFEST})")
        warn_once(str(run_dir), "%s has no %s (written before ft checked its files): its files are used "
                  "unverified", run_dir, MANIFEST)
        return path
    if name not in files:
        if not path.exists():
            raise RunFileError(f"{path} is missing")
        return path  # written after the run (ft.examples' files): not part of its record
    if not path.exists():
        raise RunFileError(f"{path} is missing: the run directory is incomplete")
    want = files[name]
    if path.stat().st_size != want["size"] or sha256_file(path) != want["sha256"]:
        raise RunFileError(f"{path} is damaged: its content does not match {MANIFEST} (sha256); "
                           "rerun it or restore the file")
    return path


def write_manifest(run_dir: Path, names: list[str], write) -> None:
    entries = {n: manifest_entry(run_dir / n) for n in names if (run_dir / n).exists()}
    text = json.dumps({"version": 1, "files": entries}, indent=1)
    write(run_dir / MANIFEST, lambda p: p.write_text(text))


def update_manifest(run_dir: Path, name: str, write) -> None:
    """Re-record one file (config.yaml, rewritten when a run resumes) in an existing manifest."""
    files = read_manifest(run_dir)
    if files is None:
        return
    files[name] = manifest_entry(run_dir / name)
    text = json.dumps({"version": 1, "files": files}, indent=1)
    write(run_dir / MANIFEST, lambda p: p.write_text(text))


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
    for p in entries:
        m = _TMP.match(p.name)
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
