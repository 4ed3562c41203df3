"""The run directory as a contract over time: kept inputs, atomic commits, resumes and re-runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ft.integrity import RunFileError
from ft.kept import changed_inputs, fingerprint, index, keep, kept


# -- ft.kept ----------------------------------------------------------------------------------
def make_folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "cfg.json").write_text('{"d_in": 4}')
    (root / "sub" / "w.bin").write_bytes(bytes(range(200)))
    (root / ".cache").mkdir()
    (root / ".cache" / "junk").write_text("ignored")
    return root


def test_fingerprint_of_a_file_is_its_sha256_and_a_folder_changes_with_any_file(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    assert fingerprint(f) == hashlib.sha256(b"abc").hexdigest()
    folder = make_folder(tmp_path / "sae")
    before = fingerprint(folder)
    (folder / ".cache" / "junk").write_text("hidden files do not count")
    assert fingerprint(folder) == before
    (folder / "sub" / "w.bin").write_bytes(bytes(range(1, 201)))
    assert fingerprint(folder) != before


def test_keep_copies_and_kept_verifies_the_copy_not_the_original(tmp_path):
    run = tmp_path / "run"
    src = make_folder(tmp_path / "mysae")
    want = fingerprint(src)
    copy = keep(run, "sae", src)
    assert copy == run / "kept" / "sae" / "mysae" and fingerprint(copy) == want
    assert not (copy / ".cache").exists()
    (src / "cfg.json").write_text('{"d_in": 8}')  # the original changes after the run: the copy is what counts
    assert kept(run, "sae") == copy and (copy / "cfg.json").read_text() == '{"d_in": 4}'
    (copy / "sub" / "w.bin").write_bytes(b"planted")  # the copy altered: refused, naming it
    with pytest.raises(RunFileError, match=r"kept sae.*altered"):
        kept(run, "sae")
    assert index(run)["sae"]["sha256"] == want and index(run)["sae"]["source"] == str(src.resolve())


def test_kept_is_none_for_runs_before_kept_and_for_unused_roles(tmp_path):
    assert kept(tmp_path / "old", "sae") is None
    f = tmp_path / "d.safetensors"
    f.write_bytes(b"x" * 10)
    keep(tmp_path / "run", "directions", f)
    assert kept(tmp_path / "run", "sae") is None
    assert kept(tmp_path / "run", "directions").read_bytes() == b"x" * 10


def test_keeping_other_content_replaces_the_copy_and_a_removed_copy_is_named(tmp_path):
    run, f = tmp_path / "run", tmp_path / "d.bin"
    f.write_bytes(b"one")
    keep(run, "directions", f)
    f.write_bytes(b"two")
    keep(run, "directions", f)
    assert kept(run, "directions").read_bytes() == b"two"
    assert not [p for p in (run / "kept").iterdir() if p.name.endswith(".tmp")]
    kept(run, "directions").unlink()
    with pytest.raises(RunFileError, match="d.bin.*missing"):
        kept(run, "directions")


def test_model_weights_are_hashed_not_copied_and_checked_in_place(tmp_path):
    run, model = tmp_path / "run", make_folder(tmp_path / "model")
    assert keep(run, "model", model) == model.resolve()
    assert not (run / "kept" / "model").exists()
    assert kept(run, "model") == model.resolve()
    (model / "sub" / "w.bin").write_bytes(b"other weights")
    with pytest.raises(RunFileError, match="model.*altered"):
        kept(run, "model")


def test_changed_inputs_compares_contents_at_the_same_path(tmp_path):
    run, f = tmp_path / "run", tmp_path / "d.bin"
    f.write_bytes(b"one")
    keep(run, "directions", f)
    assert changed_inputs(index(run), {"directions": f}) == []
    f.write_bytes(b"eno")  # same size, same path, other bytes
    [(role, path, old, new)] = changed_inputs(index(run), {"directions": f})
    assert role == "directions" and path == f and old != new


def test_a_damaged_index_is_refused_by_name(tmp_path):
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "index.json").write_text(json.dumps([1, 2]))
    with pytest.raises(RunFileError, match="index.json is damaged"):
        kept(tmp_path, "sae")


# -- results commit as one set ---------------------------------------------------------------
class Crash(BaseException):
    """kill -9 at this point: nothing after it runs (no except clause catches it)."""


def write_set(run: Path, contents: dict[str, bytes]) -> None:
    from ft.results import write_files

    write_files(run, {name: (lambda p, b=b: p.write_bytes(b)) for name, b in contents.items()})


def read_set(run: Path) -> dict[str, bytes]:
    from ft.integrity import read_manifest, verify

    return {name: verify(run, name).read_bytes() for name in read_manifest(run)}


OLD = {"targets.parquet": b"targets@20", "inputs.safetensors": b"inputs@20", "frontier.parquet": b"f@20"}
NEW = {"targets.parquet": b"targets@30", "inputs.safetensors": b"inputs@30", "curves.parquet": b"curves@30"}


@pytest.mark.parametrize("first", [True, False], ids=["first-commit", "over-old-results"])
def test_a_crash_at_any_step_of_a_commit_leaves_the_old_set_or_the_new_one(first, tmp_path, monkeypatch):
    import os

    import ft.integrity

    real_replace, real_unlink = os.replace, Path.unlink
    outcomes = set()
    for n in range(12):
        run = tmp_path / f"run{n}"
        if not first:
            write_set(run, OLD)
        calls = [0]

        def counted(op, *a, calls=calls, n=n, **k):
            calls[0] += 1
            if calls[0] > n:
                raise Crash
            return op(*a, **k)

        monkeypatch.setattr(ft.integrity.os, "replace", lambda *a, **k: counted(real_replace, *a, **k))
        monkeypatch.setattr(Path, "unlink", lambda *a, **k: counted(real_unlink, *a, **k))
        try:
            write_set(run, NEW)
            crashed = False
        except Crash:
            crashed = True
        monkeypatch.setattr(ft.integrity.os, "replace", real_replace)
        monkeypatch.setattr(Path, "unlink", real_unlink)
        if first and not (run / "manifest.json").exists() and not (run / "commit.json").exists():
            assert not any((run / name).exists() for name in NEW)  # nothing under a final name
            outcomes.add("none")
            continue
        seen = read_set(run)
        assert seen in (OLD, NEW), f"crash after {n} operations: a mixed set {seen}"
        outcomes.add("new" if seen == NEW else "old")
        assert not (run / "commit.json").exists()
        if seen == NEW:
            assert not (run / "frontier.parquet").exists()  # the old set's extra file went with it
        if not crashed:
            break
    assert "new" in outcomes and outcomes & {"old", "none"}  # both sides of the commit point were hit


def test_a_commit_whose_writer_still_runs_is_refused_by_name(tmp_path):
    from ft.integrity import read_manifest

    write_set(tmp_path, OLD)
    (tmp_path / "commit.json").write_text(json.dumps({"version": 1, "pid": 1, "files": {}, "remove": []}))
    with pytest.raises(RunFileError, match="being written by process 1"):
        read_manifest(tmp_path)


def test_a_commit_whose_staged_file_is_gone_is_refused_not_read_as_a_mix(tmp_path):
    from ft.integrity import verify

    write_set(tmp_path, OLD)
    journal = {"version": 1, "pid": 2**22 + 7, "remove": [],
               "files": {"targets.parquet": {"tmp": ".targets.parquet.99.tmp", "size": 3, "sha256": "0" * 64}}}
    (tmp_path / "commit.json").write_text(json.dumps(journal))
    with pytest.raises(RunFileError, match="targets.parquet is missing or damaged"):
        verify(tmp_path, "inputs.safetensors")
