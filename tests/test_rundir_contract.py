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
