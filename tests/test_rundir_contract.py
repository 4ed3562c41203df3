"""The run directory as a contract over time: kept inputs, atomic commits, resumes and re-runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ft.core.integrity import RunFileError
from ft.rundir.kept import changed_inputs, fingerprint, index, keep, kept


# -- ft.rundir.kept ----------------------------------------------------------------------------------
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


def test_forget_drops_a_role_and_its_copy(tmp_path):
    from ft.rundir.kept import forget

    run, f = tmp_path / "run", tmp_path / "d.bin"
    f.write_bytes(b"one")
    keep(run, "directions", f)
    keep(run, "model", make_folder(tmp_path / "model"))
    forget(run, {"directions"})
    assert kept(run, "directions") is None and not (run / "kept" / "directions").exists()
    assert set(index(run)) == {"model"}


def test_a_damaged_index_is_refused_by_name(tmp_path):
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "index.json").write_text(json.dumps([1, 2]))
    with pytest.raises(RunFileError, match="index.json is damaged"):
        kept(tmp_path, "sae")


# -- results commit as one set ---------------------------------------------------------------
class Crash(BaseException):
    """kill -9 at this point: nothing after it runs (no except clause catches it)."""


def write_set(run: Path, contents: dict[str, bytes]) -> None:
    from ft.rundir.results import write_files

    write_files(run, {name: (lambda p, b=b: p.write_bytes(b)) for name, b in contents.items()})


def read_set(run: Path) -> dict[str, bytes]:
    from ft.core.integrity import read_manifest, verify

    return {name: verify(run, name).read_bytes() for name in read_manifest(run)}


OLD = {"targets.parquet": b"targets@20", "inputs.safetensors": b"inputs@20", "frontier.parquet": b"f@20"}
NEW = {"targets.parquet": b"targets@30", "inputs.safetensors": b"inputs@30", "curves.parquet": b"curves@30"}


@pytest.mark.parametrize("first", [True, False], ids=["first-commit", "over-old-results"])
def test_a_crash_at_any_step_of_a_commit_leaves_the_old_set_or_the_new_one(first, tmp_path, monkeypatch):
    import os

    import ft.core.integrity

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

        monkeypatch.setattr(ft.core.integrity.os, "replace", lambda *a, **k: counted(real_replace, *a, **k))
        monkeypatch.setattr(Path, "unlink", lambda *a, **k: counted(real_unlink, *a, **k))
        try:
            write_set(run, NEW)
            crashed = False
        except Crash:
            crashed = True
        monkeypatch.setattr(ft.core.integrity.os, "replace", real_replace)
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
    from ft.core.integrity import read_manifest

    write_set(tmp_path, OLD)
    (tmp_path / "commit.json").write_text(json.dumps({"version": 1, "pid": 1, "files": {}, "remove": []}))
    with pytest.raises(RunFileError, match="being written by process 1"):
        read_manifest(tmp_path)
    # a writer on another host of a shared file system: never rolled forward from here, even when
    # its pid means nothing (or something else) on this host
    (tmp_path / "commit.json").write_text(json.dumps({"version": 1, "pid": 2**22 + 7, "host": "elsewhere-node",
                                                       "files": {}, "remove": []}))
    with pytest.raises(RunFileError, match="by process 4194311 on elsewhere-node"):
        read_manifest(tmp_path)


def test_a_commit_whose_staged_file_is_gone_is_refused_not_read_as_a_mix(tmp_path):
    from ft.core.integrity import verify

    write_set(tmp_path, OLD)
    journal = {"version": 1, "pid": 2**22 + 7, "remove": [],
               "files": {"targets.parquet": {"tmp": ".targets.parquet.99.tmp", "size": 3, "sha256": "0" * 64}}}
    (tmp_path / "commit.json").write_text(json.dumps(journal))
    with pytest.raises(RunFileError, match="targets.parquet is missing or damaged"):
        verify(tmp_path, "inputs.safetensors")


def test_results_without_a_manifest_but_with_staged_files_or_kept_inputs_are_refused(tmp_path):
    """What an older ft left when killed mid-commit (the manifest deleted, some files renamed, the
    others still staged) is not read as a run from before manifests."""
    from ft.core.integrity import verify

    run = tmp_path / "run"
    run.mkdir()
    (run / "targets.parquet").write_bytes(b"targets@20")
    (run / "inputs.safetensors").write_bytes(b"inputs@30")
    (run / ".targets.parquet.4194311.tmp").write_bytes(b"targets@30")
    with pytest.raises(RunFileError, match=r"inputs.safetensors is from a commit that never finished \(targets"):
        verify(run, "inputs.safetensors")
    (run / ".targets.parquet.4194311.tmp").unlink()
    f = tmp_path / "d.bin"
    f.write_bytes(b"d")
    keep(run, "directions", f)
    with pytest.raises(RunFileError, match="targets.parquet has no manifest.json beside it"):
        verify(run, "targets.parquet")


# -- runs: a finished run re-run, checkpoints anywhere, inputs by content ---------------------
def quick(tiny_dir: Path, steps: int = 20, *extra: str):
    from tests.test_train import compose_cfg, tiny_overrides

    return compose_cfg(tiny_overrides(tiny_dir, "default", steps) + [
        "logger.wandb.mode=disabled", "engine.checkpoint_every_n_steps=10", "engine.stop_when_converged=false",
        *extra])


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("steps,extra", [(20, []), (20, ["input=tokens", "engine.keep=best"]),
                                         (15, ["engine.keep=best"])],
                         ids=["embedding", "tokens-keep-best", "keep-best-between-checkpoints"])
def test_a_finished_run_re_run_changes_nothing_byte_for_byte(steps, extra, tiny_dir, tmp_path, capsys):
    from ft.train import run

    d = tmp_path / "run"
    run(quick(tiny_dir, steps, *extra), d)
    before = tree_hashes(d)
    assert {"targets.parquet", "inputs.safetensors", "curves.parquet", "manifest.json"} <= set(before)
    capsys.readouterr()
    again = run(quick(tiny_dir, steps, *extra), d)
    out = capsys.readouterr().out
    assert tree_hashes(d) == before
    assert len(out.strip().splitlines()) == 1 and out.startswith(f"run already finished: {d} (") \
        and out.strip().endswith("nothing to do")
    assert again == json.loads((d / "summary.json").read_text())


@pytest.mark.parametrize("extra", [["input=tokens"], ["engine.keep=best"]], ids=["tokens", "keep-best"])
def test_a_resume_with_no_steps_left_finishes_the_run_as_the_uninterrupted_one(extra, tiny_dir, tmp_path):
    """Stopped after the final step's checkpoint, before the results (SIGTERM at the last step):
    the resume runs no step, and its results equal the uninterrupted run's, byte for byte
    (the final curve sample and the kept inputs included)."""
    from ft.train import run

    d = tmp_path / "run"
    run(quick(tiny_dir, 20, *extra), d)
    names = ("targets.parquet", "inputs.safetensors", "curves.parquet", "frontier.parquet")
    straight = {k: v for k, v in tree_hashes(d).items() if k in names}
    for name in (*names, "summary.json", "manifest.json"):
        (d / name).unlink(missing_ok=True)
    run(quick(tiny_dir, 20, *extra), d)
    assert {k: v for k, v in tree_hashes(d).items() if k in names} == straight


def directions_cfg(tiny_dir: Path, file: Path, steps: int):
    from tests.test_train import compose_cfg, tiny_overrides

    base = [o for o in tiny_overrides(tiny_dir, "default", steps) if not o.startswith("target.")]
    return compose_cfg(base + ["logger.wandb.mode=disabled", "engine.checkpoint_every_n_steps=10",
                               "engine.stop_when_converged=false", "target=directions", f"target.file={file}",
                               "target.site=layer.1.resid"])


def save_directions(path: Path, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"directions": torch.randn(2, 32, generator=torch.Generator().manual_seed(seed))}, str(path))


def test_a_directions_file_replaced_at_the_same_path_is_refused_on_resume_and_kept_in_the_run(tiny_dir, tmp_path):
    from ft.core.errors import ConfigError
    from ft.train import run

    file, d = tmp_path / "d.safetensors", tmp_path / "run"
    save_directions(file, 0)
    original = file.read_bytes()
    run(directions_cfg(tiny_dir, file, 10), d)
    copy = kept(d, "directions")
    assert copy.read_bytes() == original and index(d)["model"]["copied"] is False
    save_directions(file, 1)  # same path, same size, other directions
    before = tree_hashes(d)
    with pytest.raises(ConfigError) as e:
        run(directions_cfg(tiny_dir, file, 20), d)  # would resume 10 -> 20 on other directions
    message = str(e.value)
    assert "\n" not in message and f"directions {file} is not the one that run started with" in message
    assert tree_hashes(d) == before  # nothing written
    file.write_bytes(original)  # restored: the resume goes on
    run(directions_cfg(tiny_dir, file, 20), d)
    assert kept(d, "directions").read_bytes() == original


def test_model_weights_changed_under_a_run_are_refused_on_resume(tiny_dir, tmp_path):
    import shutil

    from ft.core.errors import ConfigError
    from ft.train import run

    model = shutil.copytree(tiny_dir, tmp_path / "model")
    d = tmp_path / "run"
    run(quick(model, 10), d)
    weights = next(p for p in model.iterdir() if p.suffix in (".safetensors", ".bin"))
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(b ^ 0x01 for b in data[-8:])  # a few weights, same size, same path
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=f"model {model} is not the one that run started with"):
        run(quick(model, 20), d)
    with pytest.raises(RunFileError, match="altered"):
        kept(d, "model")


@pytest.fixture(scope="module")
def lr_run(tiny_dir, tmp_path_factory):
    """A 10-step run at optim.lr=0.1 whose checkpoint is then copied out of its run directory."""
    import os
    import shutil

    from ft.train import run

    root = tmp_path_factory.mktemp("lr")
    old = os.environ.get("FT_CACHE_DIR")
    os.environ["FT_CACHE_DIR"] = str(root / "cache")
    try:
        run(quick(tiny_dir, 10, "optim.lr=0.1"), root / "run")
    finally:
        os.environ.pop("FT_CACHE_DIR") if old is None else os.environ.update(FT_CACHE_DIR=old)
    loose = root / "elsewhere" / "lr01.ckpt"
    loose.parent.mkdir()
    shutil.copy(root / "run" / "checkpoints" / "last.ckpt", loose)
    return root / "run", loose


def test_a_checkpoint_outside_its_run_directory_is_checked_against_its_own_settings(lr_run, tiny_dir, tmp_path):
    from ft.core.errors import ConfigError
    from ft.train import run

    _, loose = lr_run
    d = tmp_path / "new"
    with pytest.raises(ConfigError) as e:
        run(quick(tiny_dir, 20, "optim.lr=0.5", f"ckpt_path={loose}"), d)
    message = str(e.value)
    assert "\n" not in message and str(loose) in message and "optim.lr=0.1" in message and "optim.lr=0.5" in message
    assert not d.exists() or not any(d.iterdir())


def test_a_checkpoint_outside_its_run_directory_resumes_and_is_logged(lr_run, tiny_dir, tmp_path):
    from ft.cli.resume import RESUME_LOG
    from ft.rundir.results import read_targets
    from ft.train import run

    _, loose = lr_run
    d = tmp_path / "new"
    run(quick(tiny_dir, 20, "optim.lr=0.1", f"ckpt_path={loose}"), d)
    [entry] = [json.loads(line) for line in (d / RESUME_LOG).read_text().splitlines()]
    assert entry["from"] == str(loose.resolve()) and entry["at_step"] == 10
    straight = tmp_path / "straight"
    run(quick(tiny_dir, 20, "optim.lr=0.1"), straight)
    a, b = read_targets(d), read_targets(straight)
    assert ((a.objective - b.objective).abs() / b.objective.abs().clip(lower=1e-6)).max() <= 1e-4


def test_a_foreign_checkpoint_is_refused_naming_it_and_what_made_it(lr_run, tiny_dir, tmp_path):
    from ft.core.errors import ConfigError
    from ft.train import run

    _, loose = lr_run  # an input=embedding run's checkpoint, into input=tokens
    with pytest.raises(ConfigError) as e:
        run(quick(tiny_dir, 20, "input=tokens", f"ckpt_path={loose}"), tmp_path / "new")
    message = str(e.value)
    assert "\n" not in message and str(loose) in message and "made by input=embedding" in message
    assert "input.kind='embedding'" in message and "input.kind='tokens'" in message


def test_a_checkpoint_without_a_record_outside_a_run_directory_is_refused(lr_run, tiny_dir, tmp_path):
    import torch

    from ft.core.errors import ConfigError
    from ft.train import run

    _, loose = lr_run
    ckpt = torch.load(loose, weights_only=True)
    del ckpt["ft"]  # as ft wrote checkpoints before it recorded their settings
    bare = tmp_path / "bare.ckpt"
    torch.save(ckpt, bare)
    with pytest.raises(ConfigError, match=f"checkpoint {bare} records no settings and lies outside a run directory"):
        run(quick(tiny_dir, 20, f"ckpt_path={bare}"), tmp_path / "new")


def test_an_sae_run_keeps_its_sae_and_rebuilds_its_objectives_from_the_copy(tiny, tiny_dir, tmp_path):
    """The SAE folder changes after the run: the run's objectives, rebuilt from its table, still
    reproduce its `objective` (the kept copy), while the changed original would not."""
    import torch

    from ft.measure.metrics import measure
    from ft.rundir.results import read_inputs, read_targets
    from ft.targets import readouts_of_table
    from ft.train import run
    from tests.reference import frame
    from tests.test_train import compose_cfg
    from tests.test_units import random_sae

    src = tmp_path / "sae"
    random_sae(32, 16, seed=0).save(src)
    cfg = compose_cfg([f"model.name_or_path={tiny_dir}", "target=sae", f"target.path={src}",
                       "target.site=layer.1.resid", "target.latents=[1,4]", "trainer.max_steps=5",
                       "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false", "logger.wandb.mode=disabled"])
    d = tmp_path / "run"
    run(cfg, d)
    random_sae(32, 16, seed=1).save(src)  # the original replaced after the run
    df, embeds = read_targets(d), read_inputs(d)["embeds"]

    def objectives(readouts) -> torch.Tensor:
        return measure(tiny.model, readouts, frame(tiny.model, tiny.tokenizer, embeds), position=1)

    kept_values = objectives(readouts_of_table(tiny.model, df, run_dir=d))
    assert torch.allclose(kept_values, torch.tensor(df.objective.to_numpy(), dtype=torch.float32), rtol=1e-3)
    assert not torch.allclose(objectives(readouts_of_table(tiny.model, df)), kept_values, rtol=1e-3)
    assert kept(d, "sae") == d / "kept" / "sae" / "sae"
    # ft.examples scores the kept SAE too: the original, now of another width, would be refused
    from ft.core.errors import TargetError
    from ft.examples import main as examples

    random_sae(16, 16, seed=2).save(src)
    with pytest.raises(TargetError, match="d_in=16"):
        readouts_of_table(tiny.model, df)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. a dog ran in the park.\n")
    assert examples([str(d), "--corpus", str(corpus), "--top-n", "1", "--substitutes", "0"]) == 0


# -- ft.compare: stopped and resumed, re-run when finished --------------------------------------
CMP = ["--lengths", "2", "--targets", "2", "--steps", "4", "--search-steps", "3", "--candidates", "4",
       "--patience", "2", "--weights", "0"]


def test_compare_stopped_by_sigterm_exits_143_resumes_and_a_finished_one_changes_nothing(tiny_dir, tmp_path,
                                                                                          monkeypatch, capsys):
    import os
    import signal

    import ft.measure.examples
    from ft.compare import LEDGER, main

    out = tmp_path / "cmp"
    argv = ["--model", str(tiny_dir), "--out", str(out), *CMP]
    real = ft.measure.examples.run_examples
    calls = []

    def sigterm_once(*a, **k):  # SIGTERM arrives while the corpus examples are scored
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(ft.measure.examples, "run_examples", sigterm_once)
    assert main(argv) == 143
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("interrupted") == 1
    assert err.strip().splitlines()[-1].startswith("interrupted: SIGTERM; resume with: python -m ft.compare --model")
    ledger = json.loads((out / LEDGER).read_text())
    assert set(ledger["seconds"]) == {"l2/tokens"} and ledger["partial"]["l2/examples"] >= 0
    assert not (out / "comparison.parquet").exists()
    assert main(argv) == 0  # resumed: the finished token run is not redone
    ledger = json.loads((out / LEDGER).read_text())
    assert ledger["done"] and not ledger["partial"] and len(calls) == 2
    assert set(ledger["seconds"]) == {"l2/tokens", "l2/examples", "l2/embedding", "l2/gumbel", "l2/projected"}
    capsys.readouterr()
    before = tree_hashes(out)
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == f"comparison already finished: {out}; nothing to do"
    assert tree_hashes(out) == before
    assert main([*argv[:-2], "--weights", "0.5"]) == 2  # other arguments into the same folder: refused
    assert "holds a comparison made with --weights=[0.0], this one has [0.5]" in capsys.readouterr().err
    assert tree_hashes(out) == before


def test_a_probe_target_run_keeps_the_probe_table_and_its_concept_file(tiny, tiny_dir, tmp_path):
    from ft.cli.probe_run import probe
    from ft.core.integrity import RunFileError
    from ft.train import run
    from tests.test_probe import ANIMALS, OTHERS, concept_file, planted_encoder, probe_cfg
    from tests.test_train import compose_cfg

    enc = planted_encoder(tiny)
    concept = Path(concept_file(tmp_path, [(w, "1") for w in ANIMALS] + [(w, "0") for w in OTHERS[:9]]))
    probe(probe_cfg(str(concept)), tmp_path / "probe", enc)
    text = concept.read_text()

    def cfg(steps: int):
        return compose_cfg([f"model.name_or_path={tiny_dir}", "target=probe", f"target.run={tmp_path / 'probe'}",
                            "target.k=3", f"trainer.max_steps={steps}", "trainer.accelerator=cpu",
                            "logger.wandb.mode=disabled", "+trainer.enable_progress_bar=false",
                            "engine.checkpoint_every_n_steps=5", "engine.stop_when_converged=false"])

    d = tmp_path / "run"
    run(cfg(5), d, enc)
    assert kept(d, "concept").read_text() == text
    assert kept(d, "probe").read_bytes() == (tmp_path / "probe" / "probe.parquet").read_bytes()
    concept.write_text(text.replace("cat,1", "cat,0"))  # the concept relabelled after the runs
    assert kept(d, "concept").read_text() == text
    run(cfg(10), d, enc)  # resumes: the concept it reads is the probe run's kept copy, as before
    assert kept(d, "concept").read_text() == text
    probe_copy = kept(tmp_path / "probe", "concept")
    probe_copy.write_text(text.replace("cat,1", "cat,0"))  # the probe run's own copy altered
    with pytest.raises(RunFileError, match="was altered"):
        run(cfg(15), d, enc)


# -- the process boundary: exit codes and what is printed ----------------------------------------
def clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {"WANDB_MODE": "offline"}


@pytest.mark.slow
def test_cli_a_finished_run_re_run_exits_0_in_one_line_and_keeps_its_results(tiny_dir, tmp_path):
    import subprocess
    import sys

    d = tmp_path / "run"
    cmd = [sys.executable, "-m", "ft.train", f"model.name_or_path={tiny_dir}", "trainer.max_steps=6",
           "target.per_layer=2", "logger.wandb.mode=disabled", "+trainer.enable_progress_bar=false",
           f"hydra.run.dir={d}"]
    first = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    before = tree_hashes(d)  # every file, Hydra's own .hydra/ files and train.log included
    assert {".hydra/overrides.yaml", "train.log", "targets.parquet"} <= set(before)
    # again, with a setting a resume may change (Hydra would record the new overrides in .hydra/)
    again = subprocess.run([*cmd, "log_level=warning"], env=clean_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.strip() == f"run already finished: {d} (6 steps); nothing to do"
    assert tree_hashes(d) == before


@pytest.mark.slow
def test_cli_sigterm_during_compare_exits_143_in_one_line_and_resumes(tiny_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from ft.compare import LEDGER

    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "ft.compare", "--model", str(tiny_dir), "--out", str(out), *CMP]
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / LEDGER).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # the token run finished; the examples or the next run are under way
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted: SIGTERM")
    done = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / LEDGER).read_text())["done"] and (out / "comparison.parquet").exists()


@pytest.mark.parametrize("signum,where,what", [
    ("SIGTERM", "prepare_targets", "loading the model and building the targets"),
    ("SIGINT", "prepare_targets", "loading the model and building the targets"),
    ("SIGTERM", "build_loggers", "starting the run"),
])
def test_a_signal_while_the_targets_are_built_stops_in_one_line_with_nothing_written(signum, where, what, tiny,
                                                                                     tiny_dir, tmp_path, monkeypatch):
    """Between the model load and the first step (vocabulary sweeps, the demo SAE's aftermath): the
    run stops at once with ft's exit convention, and no results or checkpoint appear."""
    import os
    import signal

    import ft.cli.run
    from ft.core.signals import Interrupted
    from tests.test_train import compose_cfg

    real = getattr(ft.cli.run, where)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), getattr(signal, signum))
        return real(*args, **kwargs)

    monkeypatch.setattr(ft.cli.run, where, signalled)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    cfg = compose_cfg([f"model.name_or_path={tiny_dir}", "trainer.max_steps=3", "target.per_layer=1",
                       "logger.wandb.mode=disabled", "+trainer.enable_progress_bar=false"])
    with pytest.raises(Interrupted, match=f"{signum} while {what}") as e:
        ft.cli.run.run(cfg, tmp_path / "run", tiny)
    assert e.value.exit_code == 128 + getattr(signal, signum)
    assert not (tmp_path / "run" / "targets.parquet").exists() and not (tmp_path / "run" / "checkpoints").exists()
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are given back


def test_a_start_over_retires_the_old_results_so_no_reader_mixes_them_with_its_config(tiny, tiny_dir, tmp_path,
                                                                                       monkeypatch):
    """A finished run started over with other settings (ckpt_path=none) and stopped before its
    first commit: the directory no longer offers the old targets beside the new config, the same
    command is not taken for finished, and running it again completes the new run."""
    import ft.cli.run
    from ft.cli.resume import finished_step
    from ft.core.integrity import RunFileError
    from ft.rundir.results import read_config, read_targets
    from ft.train import run
    from tests.test_train import compose_cfg

    base = [f"model.name_or_path={tiny_dir}", "trainer.max_steps=3", "logger.wandb.mode=disabled",
            "+trainer.enable_progress_bar=false"]
    d = tmp_path / "run"
    run(compose_cfg([*base, "target.sites=[layer.0.ffn_out.1]"]), d, tiny)
    assert [list(s) for s in read_targets(d).sites] == [["layer.0.ffn_out.1"]]
    other = compose_cfg([*base, "target.sites=[layer.0.ffn_out.2]", "ckpt_path=none"])

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # the start-over dies after its config, before its first step

    monkeypatch.setattr(ft.cli.run, "build_loggers", stopped)
    with pytest.raises(KeyboardInterrupt):
        run(other, d, tiny)
    monkeypatch.undo()
    assert list(read_config(d).target.sites) == ["layer.0.ffn_out.2"]
    with pytest.raises(RunFileError):
        read_targets(d)  # not the old targets under the new config
    again = compose_cfg([*base, "target.sites=[layer.0.ffn_out.2]"])
    assert finished_step(again, d) is None
    run(again, d, tiny)
    assert [list(s) for s in read_targets(d).sites] == [["layer.0.ffn_out.2"]]


def test_readers_load_the_model_folder_the_run_read_from_any_working_directory(tiny_dir, tmp_path, monkeypatch):
    """A run made with a relative model.name_or_path: ft.examples, started from another directory
    (where that relative path names nothing, or another model), scores with the folder the run
    read, checked against its fingerprint."""
    from ft.examples import main as examples
    from ft.rundir.kept import model_to_load
    from ft.train import run
    from tests.test_train import compose_cfg

    monkeypatch.chdir(tiny_dir.parent)
    d = tmp_path / "run"
    run(compose_cfg([f"model.name_or_path={tiny_dir.name}", "trainer.max_steps=2", "target.per_layer=1",
                     "logger.wandb.mode=disabled", "+trainer.enable_progress_bar=false"]), d)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / tiny_dir.name).mkdir(parents=True)  # another folder of that name: not a model
    monkeypatch.chdir(elsewhere)
    assert model_to_load(d, tiny_dir.name) == str(tiny_dir.resolve())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. a dog ran in the park.\n")
    assert examples([str(d), "--corpus", str(corpus), "--top-n", "1", "--substitutes", "0"]) == 0


def test_a_write_refused_by_another_writers_commit_leaves_no_staged_files(tmp_path):
    from ft.rundir.results import write_files

    write_set(tmp_path, OLD)
    (tmp_path / "commit.json").write_text(json.dumps({"version": 1, "pid": 1, "files": {}, "remove": []}))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RunFileError, match="being written by process 1"):
        write_files(tmp_path, {"summary.json": lambda p: p.write_text("{}")})
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no .summary.json.PID.tmp left


def test_kept_copies_without_their_index_are_refused_not_read_as_a_run_that_kept_nothing(tmp_path):
    src = tmp_path / "directions.txt"
    src.write_text("v")
    run = tmp_path / "run"
    keep(run, "directions", src)
    (run / "kept" / "index.json").unlink()
    with pytest.raises(RunFileError, match="index.json is missing beside kept inputs"):
        kept(run, "directions")
