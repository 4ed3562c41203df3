"""Writing files so that a crash never leaves a half-written file under a final name, and the
cache folder (FT_CACHE_DIR, default ~/.cache/ft)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ft.core.integrity import StorageError, storage_error, temp_name


def cache_dir() -> Path:
    """Where vocabulary sweeps, demo SAEs and other derived data are cached."""
    return Path(os.environ.get("FT_CACHE_DIR", Path.home() / ".cache" / "ft"))


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp), flush it to disk and rename tmp to path. A failed write (disk full,
    read-only) leaves no temporary file and raises StorageError naming `path` and the cause."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except StorageError:
        raise
    except OSError as e:
        raise storage_error(path, e) from None
    finally:
        discard(tmp)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
