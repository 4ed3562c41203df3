"""The inputs a run depends on, kept inside it: `<run>/kept/<role>/<name>`, each with its sha256.

A run copies every input file or folder it reads (an SAE folder, a directions file, a probe
run's concept file, ...) into `kept/` when it starts and records its fingerprint in
`kept/index.json`; later readers (resume, ft.export, ft.examples) go through `kept(run_dir, role)`,
which verifies the copy and never re-reads the original path. Large model weights are recorded
by fingerprint only (`HASH_ONLY`): `kept` then checks the original still matches.

- `fingerprint(path)`: sha256 of a file; of a folder, of its files' relative paths and sha256s.
- `keep(run_dir, role, path)`: copy (atomically: a staging folder, then a rename) and record.
- `kept(run_dir, role)`: the verified path, or None for runs written before ft kept inputs (or
  a role the run does not use); RunFileError naming the file when it was altered or removed.
- `forget(run_dir, roles)`: drop roles a run started over no longer reads.
- `changed_inputs(recorded, current)`: which recorded inputs differ from files now on disk (resume).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from ft.core.integrity import RunFileError, pid_alive, sha256_file, storage_error

KEPT = "kept"
INDEX = "index.json"
# recorded by fingerprint, not copied: models (hundreds of MB) and corpora (a dataset folder per run
# and sweep job would be too much); read only while the run runs, so resume compares their contents
HASH_ONLY = frozenset({"model", "fluency_model", "corpus", "fluency_corpus"})
_ROLE = re.compile(r"^[a-z][a-z0-9_-]*$")
_STAGE = re.compile(r"^\..+\.(?P<pid>\d+)\.tmp$")


def fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes; for a folder, of the sorted lines `relative path<TAB>sha256` of its
    regular files (hidden names skipped: `.git`, `.cache`, temporary files)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise RunFileError(f"{path} does not exist: nothing to fingerprint")
    h = hashlib.sha256()
    for f in folder_files(path):
        h.update(f"{f.relative_to(path).as_posix()}\t{sha256_file(f)}\n".encode())
    return h.hexdigest()


def folder_files(folder: Path) -> list[Path]:
    """The regular files under `folder`, sorted, none under a hidden name."""
    out = []
    for f in folder.rglob("*"):
        rel = f.relative_to(folder).parts
        if f.is_file() and not any(p.startswith(".") for p in rel):
            out.append(f)
    return sorted(out)


def index(run_dir: str | Path) -> dict[str, dict]:
    """`kept/index.json`: {role: {source, sha256, path, copied}}; {} for a run that kept nothing."""
    path = Path(run_dir) / KEPT / INDEX
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return {str(k): dict(v) for k, v in data["inputs"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise RunFileError(f"{path} is damaged ({type(e).__name__}); the run's kept inputs cannot be trusted") from None


def keep(run_dir: str | Path, role: str, path: str | Path, digest: str | None = None) -> Path:
    """Copy `path` (a file or folder) into `<run_dir>/kept/<role>/` and record its sha256; returns
    the copy (for HASH_ONLY roles: records the fingerprint and returns `path`). Keeping the same
    content again is cheap; other content replaces the copy. `digest`: the fingerprint the caller
    took when it read `path`; a copy that differs from it (the file changed since) is refused."""
    if not _ROLE.match(role):
        raise ValueError(f"role {role!r}; valid: lowercase letters, digits, '_' and '-'")
    run_dir, src = Path(run_dir), Path(str(path)).expanduser().resolve()
    if not src.exists():
        raise RunFileError(f"{src} does not exist: the run cannot keep its {role}")
    have = index(run_dir).get(role)
    digest = digest or fingerprint(src)
    if role in HASH_ONLY:
        if have and have.get("sha256") == digest and have.get("source") == str(src):
            return src
        record(run_dir, role, {"source": str(src), "sha256": digest, "path": None, "copied": False})
        return src
    dest = run_dir / KEPT / role / src.name
    if have and have.get("sha256") == digest and have.get("path") == f"{role}/{src.name}" and dest.exists() \
            and fingerprint(dest) == digest:
        return dest
    copy_in(src, run_dir / KEPT / role, digest)
    record(run_dir, role, {"source": str(src), "sha256": digest, "path": f"{role}/{src.name}", "copied": True})
    return dest


def copy_in(src: Path, folder: Path, digest: str) -> None:
    """Copy `src` into a staging folder beside `folder`, check its fingerprint, swap it in."""
    parent = folder.parent
    stage = parent / f".{folder.name}.{os.getpid()}.tmp"
    old = parent / f".{folder.name}.old.{os.getpid()}.tmp"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_stages(parent)
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        if src.is_dir():
            shutil.copytree(src, stage / src.name, ignore=shutil.ignore_patterns(".*"))
        else:
            shutil.copy2(src, stage / src.name)
        sync_tree(stage)
        if fingerprint(stage / src.name) != digest:
            raise RunFileError(f"{src} changed while it was being copied into {folder}; run again")
        if folder.exists():
            os.replace(folder, old)
        os.replace(stage, folder)
    except OSError as e:
        raise storage_error(folder, e) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def sync_tree(folder: Path) -> None:
    for f in [folder, *folder.rglob("*")]:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def remove_stale_stages(parent: Path) -> None:
    """Staging folders of killed writers (their pid is gone)."""
    for p in parent.iterdir():
        m = _STAGE.match(p.name)
        if m and p.is_dir() and int(m.group("pid")) != os.getpid() and not pid_alive(int(m.group("pid"))):
            shutil.rmtree(p, ignore_errors=True)


def record(run_dir: Path, role: str, entry: dict) -> None:
    from ft.core.files import atomic_write

    inputs = index(run_dir)
    inputs[role] = entry
    text = json.dumps({"version": 1, "inputs": inputs}, indent=1, sort_keys=True)
    atomic_write(run_dir / KEPT / INDEX, lambda p: p.write_text(text))


def forget(run_dir: str | Path, roles: set[str] | frozenset[str]) -> None:
    """Drop `roles` from the run's kept inputs (a run started over that no longer reads them)."""
    run_dir = Path(run_dir)
    inputs = index(run_dir)
    if not set(inputs) & set(roles):
        return
    from ft.core.files import atomic_write

    for role in set(inputs) & set(roles):
        del inputs[role]
        shutil.rmtree(run_dir / KEPT / role, ignore_errors=True)
    text = json.dumps({"version": 1, "inputs": inputs}, indent=1, sort_keys=True)
    atomic_write(run_dir / KEPT / INDEX, lambda p: p.write_text(text))


def kept(run_dir: str | Path, role: str) -> Path | None:
    """The run's verified copy of its `role` input; None when the run kept none (written before
    ft kept inputs, or a role it does not use). RunFileError naming the file when it was altered
    or removed since the run kept it."""
    recorded = index(run_dir)
    if not recorded and any(p.is_dir() and not p.name.startswith(".") for p in (Path(run_dir) / KEPT).glob("*")):
        raise RunFileError(f"{Path(run_dir) / KEPT / INDEX} is missing beside kept inputs; the run's kept inputs "
                           "cannot be trusted")
    entry = recorded.get(role)
    if entry is None:
        return None
    path = Path(run_dir) / KEPT / entry["path"] if entry.get("copied") else Path(entry["source"])
    what = f"the run's kept {role}" if entry.get("copied") else f"the {role} {Path(run_dir)} was made with"
    if not path.exists():
        raise RunFileError(f"{path} ({what}) is missing; valid: restore it, or rerun in a new run directory")
    now = fingerprint(path)
    if now != entry["sha256"]:
        raise RunFileError(f"{path} ({what}) was altered: sha256 {now[:12]} != {entry['sha256'][:12]} recorded in "
                           f"{Path(run_dir) / KEPT / INDEX}; valid: restore it, or rerun in a new run directory")
    return path


def changed_inputs(recorded: dict[str, dict], current: dict[str, Path]) -> list[tuple[str, Path, str, str]]:
    """(role, path, recorded sha256, current sha256) for each input in `current` whose recorded
    fingerprint differs (a role recorded from another source path counts too)."""
    out = []
    for role, path in current.items():
        entry = recorded.get(role)
        if entry is None:
            continue
        now = fingerprint(path) if Path(path).exists() else "missing"
        if now != entry.get("sha256"):
            out.append((role, Path(path), str(entry.get("sha256")), now))
    return out


def model_to_load(run_dir: str | Path, name_or_path: str) -> str:
    """What a later reader loads for the run's `model.name_or_path`: the model folder the run read
    (verified: RunFileError when it changed since), by its recorded absolute path when the config
    gives a relative one (another working directory would find another folder); else the name."""
    path = kept(run_dir, "model")
    relative = not str(name_or_path).startswith(("packaged:", "hf:")) and not Path(str(name_or_path)).expanduser(
    ).is_absolute()
    return str(path) if path is not None and relative else str(name_or_path)
