"""Integrity and faults: nothing corrupt is used, nothing recorded that did not run, a fault is one
line naming the path and the cause, and the run directory holds all results or none."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from ft.cli.resume import RESUME_LOG
from ft.core.errors import ConfigError, FtError
from ft.core.integrity import MANIFEST, RunFileError, StorageError, strict_summary
from ft.model.encoder import load_encoder
from ft.model.vocab import Vocabulary, cache_dir, load_or_sweep, model_key, sweep_vocabulary
from ft.rundir.results import load_runs, read_inputs, read_summary, read_targets, write_run
from ft.train import run
from tests.faults import fill, tmpfs
from tests.test_train import compose_cfg, tiny_overrides

RESULTS = ("targets.parquet", "inputs.safetensors", "summary.json", "curves.parquet", MANIFEST)


def quick(tiny_dir: Path, steps: int = 20, *extra: str):
    return compose_cfg(tiny_overrides(tiny_dir, "default", steps) + [
        "logger.wandb.mode=disabled", "engine.checkpoint_every_n_steps=10", "engine.stop_when_converged=false",
        *extra])


@pytest.fixture(scope="module")
def finished(tiny_dir, tmp_path_factory):
    """A finished 20-step run; tests copy it before damaging anything."""
    import shutil

    root = tmp_path_factory.mktemp("finished")
    old = os.environ.get("FT_CACHE_DIR")
    os.environ["FT_CACHE_DIR"] = str(root / "cache")  # module scope: the per-test isolation is not set yet
    try:
        run(quick(tiny_dir), root / "run")
    finally:
        os.environ.pop("FT_CACHE_DIR") if old is None else os.environ.update(FT_CACHE_DIR=old)
    yield root / "run"
    shutil.rmtree(root, ignore_errors=True)


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def flip(path: Path, at: float = 0.5, n: int = 4) -> None:
    """Damage `n` data bytes in the middle of a file, leaving its header and footer intact."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i:i + n] = bytes(b ^ 0xFF for b in data[i:i + n])
    path.write_bytes(bytes(data))


# -- the vocabulary cache --------------------------------------------------------------------------
def cache_file(tiny) -> Path:
    return cache_dir() / "vocab_sweep" / f"{model_key(tiny)}_ffn_out_p1.safetensors"


def test_damaged_cache_data_is_rebuilt_with_a_warning(tiny, caplog):
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    fresh = load_or_sweep(tiny, vocab, "ffn_out")
    path = cache_file(tiny)
    flip(path, at=0.9)  # inside the tensor bytes; the header still parses
    with caplog.at_level(logging.WARNING):
        again = load_or_sweep(tiny, vocab, "ffn_out")
    assert "is damaged" in caplog.text and str(path) in caplog.text
    assert torch.equal(again, fresh)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert torch.equal(load_or_sweep(tiny, vocab, "ffn_out"), fresh)  # rebuilt file verifies
    assert "damaged" not in caplog.text


def test_cache_from_before_checksums_loads_with_a_warning(tiny, caplog):
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    acts = sweep_vocabulary(tiny, vocab, "ffn_out")
    path = cache_file(tiny)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"acts": acts + 1.0}, str(path))  # no metadata, planted values: it must be the one used
    with caplog.at_level(logging.WARNING):
        used = load_or_sweep(tiny, vocab, "ffn_out")
    assert "has no checksum" in caplog.text and torch.equal(used, acts + 1.0)


def test_cache_key_covers_every_weight_and_the_tokenizer(tiny_dir, tmp_path):
    from transformers import BertTokenizerFast

    from ft.model.encoder import from_model
    from tests.conftest import VOCAB

    a = load_encoder(str(tiny_dir))
    b = load_encoder(str(tiny_dir))
    assert model_key(a) == model_key(b)
    with torch.no_grad():  # a weight that neither the embeddings nor the last layer hold
        b.model.encoder.layer[0].attention.self.query.bias[3] += 1e-3
    assert model_key(a) != model_key(b)
    other_tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB[:5] + VOCAB[6:] + VOCAB[5:6])})
    c = from_model(load_encoder(str(tiny_dir)).model, other_tok, "same weights, other vocabulary")
    assert model_key(c) != model_key(a)


def test_a_killed_cache_write_leaves_no_temporary_file(tiny):
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    folder = cache_dir() / "vocab_sweep"
    folder.mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = folder / f".{model_key(tiny)}_resid_p1.safetensors.{dead.pid}.tmp"  # a killed writer's
    stale.write_bytes(b"\0" * 4096)
    live = folder / f".other.safetensors.{os.getppid()}.tmp"  # a running writer's: left alone
    live.write_bytes(b"x")
    load_or_sweep(tiny, vocab, "ffn_out")
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("kind", ["read-only", "full"])
def test_an_unwritable_cache_is_a_warning_not_a_failure(kind, tiny_dir, tmp_path, monkeypatch, caplog):
    mount = tmp_path / "cache"
    with tmpfs(mount, size="16k", read_only=kind == "read-only"):
        monkeypatch.setenv("FT_CACHE_DIR", str(mount))
        with caplog.at_level(logging.WARNING):
            summary = run(quick(tiny_dir, 3), tmp_path / "run")
        assert "vocabulary sweep not cached" in caplog.text and str(mount) in caplog.text
        assert summary["final/activation_mean"] == pytest.approx(read_targets(tmp_path / "run").objective.mean())
        assert not list(mount.rglob("*.tmp"))  # a full disk's half-written file is gone


# -- run files -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,at", [("targets.parquet", 0.3), ("inputs.safetensors", 0.8),
                                     ("curves.parquet", 0.3), ("summary.json", 0.5), ("config.yaml", 0.5)])
def test_a_damaged_run_file_is_refused_by_name(name, at, finished, tmp_path):
    bad = copy_run(finished, tmp_path / "bad")
    flip(bad / name, at=at, n=2)
    reader = {"targets.parquet": read_targets, "inputs.safetensors": read_inputs, "summary.json": read_summary}
    from ft.rundir.results import read_config, read_curves

    reader |= {"curves.parquet": read_curves, "config.yaml": read_config}
    with pytest.raises(RunFileError, match=f"{bad / name} is damaged"):
        reader[name](bad)


def test_report_skips_a_damaged_and_an_incomplete_run_and_names_them(finished, tmp_path, caplog):
    from ft.cli.report import build_report

    good = copy_run(finished, tmp_path / "runs" / "good")
    bad = copy_run(finished, tmp_path / "runs" / "bad")
    flip(bad / "targets.parquet", at=0.3, n=2)
    unfinished = tmp_path / "runs" / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((good / "config.yaml").read_text())
    with caplog.at_level(logging.WARNING):
        targets, runs = load_runs([tmp_path / "runs"])
        out = build_report([str(tmp_path / "runs")], tmp_path / "r.html", words=0)
    assert list(runs.path) == [str(good)] and len(targets) == len(read_targets(good))
    assert f"skipping run {bad}" in caplog.text and f"skipping run {unfinished}" in caplog.text
    assert out.exists() and "1 runs" in out.read_text()


def test_a_run_directory_from_before_manifests_loads_with_a_warning(finished, tmp_path, caplog):
    import shutil

    old = copy_run(finished, tmp_path / "old")
    (old / MANIFEST).unlink()
    shutil.rmtree(old / "kept")  # an ft without manifests kept no inputs either
    with caplog.at_level(logging.WARNING):
        df = read_targets(old)
    assert len(df) == len(read_targets(finished)) and "has no manifest.json" in caplog.text


def test_summary_json_is_strict_and_says_why_a_value_is_null(tmp_path):
    from omegaconf import OmegaConf

    df = pd.DataFrame({"target_id": [0], "objective": [1.0]})
    summary = {"final/a": float("inf"), "final/b": float("nan"), "final/c": 2.0}
    write_run(tmp_path / "run", OmegaConf.create({}), df, {"embeds": torch.zeros(1, 1, 2)}, summary)
    text = (tmp_path / "run" / "summary.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["final/a"] is None and data["final/b"] is None and data["final/c"] == 2.0
    assert any("final/a was inf" in n for n in data["notes"]) and any("final/b was nan" in n for n in data["notes"])
    assert strict_summary({"x": 1.0}) == {"x": 1.0}


# -- resume ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,key", [
    ("optim.lr=0.3", "optim.lr=0.1"), ("optim=sgd", "optim._target_='torch.optim.Adam'"),
    ("reg.norm=0.5", "reg.norm=0.0"), ("engine.converge_tol=0.01", "engine.converge_tol=0.0001"),
    ("trainer.precision=bf16-mixed", "trainer.precision='32-true'"),
])
def test_resume_with_a_changed_setting_is_refused_before_anything_is_written(change, key, finished, tiny_dir,
                                                                              tmp_path):
    d = copy_run(finished, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    with pytest.raises(ConfigError) as e:
        run(quick(tiny_dir, 20, change), d)
    message = str(e.value)
    assert f"it was made with {key}" in message and "this run has" in message and "\n" not in message
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} == before  # config.yaml included


def test_resume_with_an_allowed_change_records_what_ran(finished, tiny_dir, tmp_path):
    d = copy_run(finished, tmp_path / "run")
    run(quick(tiny_dir, 30), d)  # 20 steps were done; 10 more
    log = [json.loads(line) for line in (d / RESUME_LOG).read_text().splitlines()]
    assert log[-1]["at_step"] == 20 and log[-1]["changed"] == {"trainer.max_steps": [20, 30]}
    assert "max_steps: 30" in (d / "config.yaml").read_text()
    straight = tmp_path / "straight"
    run(quick(tiny_dir, 30), straight)
    a, b = read_targets(d), read_targets(straight)
    assert (a.steps == 30).all()
    assert ((a.objective - b.objective).abs() / b.objective.abs().clip(lower=1e-6)).max() <= 1e-4


def test_a_truncated_checkpoint_is_one_line_naming_it(finished, tiny_dir, tmp_path):
    d = copy_run(finished, tmp_path / "run")
    ckpt = d / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    config = (d / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match=f"checkpoint {ckpt} is unreadable .*cut short or damaged"):
        run(quick(tiny_dir, 20), d)
    assert (d / "config.yaml").read_bytes() == config


# -- faults while writing ----------------------------------------------------------------------------
def test_a_disk_full_at_the_end_leaves_no_results_and_names_the_file(tiny_dir, tmp_path):
    mount = tmp_path / "disk"
    with tmpfs(mount, size="2m"):
        cfg = quick(tiny_dir, 5, "logger.csv=null", "+callbacks.fill._target_=tests.faults.FillDisk",
                    f"+callbacks.fill.folder={mount}")
        with pytest.raises(StorageError) as e:
            run(cfg, mount / "run")
        assert "No space left on device" in str(e.value) and str(mount / "run") in str(e.value)
        left = {p.name for p in (mount / "run").iterdir()}
        assert not left & set(RESULTS) and not [n for n in left if n.endswith(".tmp")], left


def test_a_disk_full_at_a_checkpoint_names_the_checkpoint(tiny_dir, tmp_path):
    mount = tmp_path / "disk"
    with tmpfs(mount, size="2m"):
        cfg = quick(tiny_dir, 15, "logger.csv=null", "+callbacks.fill._target_=tests.faults.FillDisk",
                    f"+callbacks.fill.folder={mount}", "+callbacks.fill.when=train_start")
        with pytest.raises(StorageError, match=r"cannot write .*checkpoints/.*\.ckpt: No space left on device"):
            run(cfg, mount / "run")
        assert not list((mount / "run").rglob("*.tmp"))


def test_a_read_only_run_directory_is_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    from ft.cli.preflight import preflight

    mount = tmp_path / "ro"
    with tmpfs(mount, read_only=True):
        with pytest.raises(StorageError, match=f"cannot write {mount / 'run'}: Read-only file system"):
            run(quick(tiny_dir, 3), mount / "run")
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            preflight([f"model.name_or_path={tiny_dir}", f"hydra.run.dir={mount / 'run'}"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{mount} is on a read-only file system" in err


def test_fill_makes_the_disk_full(tmp_path):
    mount = tmp_path / "disk"
    with tmpfs(mount, size="256k"):
        fill(mount)
        with pytest.raises(OSError, match="No space left"):
            (mount / "more").write_bytes(b"\0" * 65536)


# -- tools on bad run directories and bad arguments ------------------------------------------------
def test_report_output_into_a_read_only_place_fails_before_the_work(finished, tmp_path, capsys):
    from ft.report import main

    mount = tmp_path / "ro"
    with tmpfs(mount, read_only=True):
        code = main([str(finished), "-o", str(mount / "report.html"), "--words", "0"])  # (python -m: sys.exit(main()))
    assert code == 2
    out = capsys.readouterr()
    assert "Read-only file system" in out.err and "report:" not in out.out and len(out.err.strip().splitlines()) == 1


def test_examples_on_a_run_without_config_is_one_line(finished, tmp_path, capsys):
    from ft.examples import main

    d = copy_run(finished, tmp_path / "run")
    (d / "config.yaml").unlink()
    assert main([str(d), "--substitutes", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and f"{d / 'config.yaml'} is missing" in err[-1]


@pytest.mark.parametrize("args,message", [
    (["--model", "/missing"], "--model='/missing': no such directory"),
    (["--chunk-size", "0"], "--chunk-size=0; valid: an integer >= 1"),
    (["--naive-per-layer", "0"], "--naive-per-layer=0; valid: an integer >= 1"),
    (["--lr", "-1"], "--lr=-1.0; valid: a finite number > 0"),
    (["--report-runs", "-2"], "--report-runs=-2; valid: >= 0"),
])
def test_bench_arguments_are_checked_before_the_work(args, message, capsys):
    from ft.bench import main

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_errors_name_their_files(tmp_path):
    assert issubclass(RunFileError, FtError) and issubclass(StorageError, OSError)
    with pytest.raises(RunFileError, match=f"{tmp_path / 'targets.parquet'} is missing"):
        read_targets(tmp_path)
