"""Refusals a hostile tester found (issue 35), by class: A silent wrong values; B one line
instead of a traceback; C nothing left behind by a refused command; D processes and paths.
Each asserts the exact value kept, or one line, exit 2 and nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

from ft.core.errors import ConfigError, FtError
from tests.conftest import VOCAB
from tests.test_train import compose_cfg

ROOT = Path(__file__).resolve().parents[1]


def _vocab(enc):
    from ft.model.vocab import Vocabulary

    return Vocabulary.from_tokenizer(enc.tokenizer)


def save_mlm(path: Path, vocab: list[str] | None) -> Path:
    """A masked LM as large as the tiny model's vocabulary, with `vocab` as its tokenizer (none: no
    tokenizer files)."""
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(VOCAB), hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                               intermediate_size=8, max_position_embeddings=16)).save_pretrained(path)
    if vocab is not None:
        BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True).save_pretrained(path)
    return path


# -- A: silent wrong values ------------------------------------------------------------------------
def test_a_fluency_model_of_the_same_size_but_another_vocabulary_is_refused(tiny, tiny_dir, tmp_path):
    from ft.measure.fluency import build_fluency

    swapped = list(VOCAB)
    swapped[-1], swapped[-2] = swapped[-2], swapped[-1]  # same size, two ids exchanged
    with pytest.raises(ConfigError, match=r"another vocabulary than the model \(2 tokens differ.*valid: a masked LM"):
        build_fluency(str(save_mlm(tmp_path / "swapped", swapped)), tiny, _vocab(tiny), str(tiny_dir))
    with pytest.raises(ConfigError, match="has no readable tokenizer"):
        build_fluency(str(save_mlm(tmp_path / "bare", None)), tiny, _vocab(tiny), str(tiny_dir))
    same = build_fluency(str(save_mlm(tmp_path / "same", VOCAB)), tiny, _vocab(tiny), str(tiny_dir))
    assert same.name == "mlm-pll:same"
    # the probe ablation's masked LM (ablate.mlm=DIR) is held to the same rule
    from ft.measure.probe_ablation import find_mlm

    with pytest.raises(ConfigError, match=r"ablate.mlm=.* another vocabulary than the model \(2 tokens differ"):
        find_mlm(str(tmp_path / "swapped"), tiny, str(tiny_dir))
    with pytest.raises(ConfigError, match=r"ablate.mlm=.* has no readable tokenizer"):
        find_mlm(str(tmp_path / "bare"), tiny, str(tiny_dir))
    assert find_mlm(str(tmp_path / "same"), tiny, str(tiny_dir)) is not None


def test_load_runs_reads_a_string_as_one_path_not_its_characters(tmp_path, monkeypatch):
    import ft
    import ft.rundir.results

    seen: list = []
    monkeypatch.setattr(ft.rundir.results, "load_runs", lambda paths: seen.append(paths) or "tables")
    assert ft.load_runs(str(tmp_path)) == "tables" and seen[-1] == [str(tmp_path)]
    assert ft.load_runs(tmp_path) == "tables" and seen[-1] == [tmp_path]
    assert ft.load_runs(p for p in [str(tmp_path), "x/*"]) == "tables" and seen[-1] == [str(tmp_path), "x/*"]
    for bad, message in ((42, "paths=42; valid"), ([tmp_path, 3], "paths: 3 is a int"), (b"/", "paths=b'/'")):
        with pytest.raises(ConfigError, match=message):
            ft.load_runs(bad)


def test_load_runs_of_a_missing_folder_string_is_empty():
    import ft

    targets, runs = ft.load_runs("/nonexistent-ft-runs")
    assert runs.empty and targets.empty


@pytest.mark.parametrize("override, key", [
    ("target.sites=[]", "sites"), ("target.layers=[]", "layers"), ("target=groups target.words=[]", "words"),
    ("target=sae target.latents=[]", "latents"), ("target=logits target.classes=[]", "classes"),
])
def test_an_empty_list_is_refused_where_null_means_sample(override, key):
    from ft.api import compose_config

    with pytest.raises(ConfigError, match=rf"^target\.{key}=\[\] is an empty list; valid: null"):
        compose_config(override.split())


def test_textualize_with_no_sites_is_refused(tiny_dir, tmp_path):
    import ft

    with pytest.raises(ConfigError, match=r"target\.sites=\[\] is an empty list"):
        ft.textualize(sites=[], model=str(tiny_dir), steps=1, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_act_metrics_are_the_activation_alone_at_a_huge_fluency_weight(tiny_dir, tmp_path):
    """At w = 1e6 the walk's value is dominated by w x fluency (about -1e6 x a few nats); act/* and
    the bar must stay the activation objective of the kept texts, and fluency/mean their fluency."""
    from ft.rundir.results import read_curves, read_targets
    from ft.train import run
    from tests.test_search import search_cfg

    run(search_cfg(tiny_dir, "logger.wandb.mode=offline", "target.per_layer=1", "input.length=2",
                   "trainer.max_steps=3", "trainer.log_every_n_steps=1", "search.fluency_weights=[1000000]",
                   "search.fluency_model=bigram"),
        tmp_path / "run")
    df = read_targets(tmp_path / "run")
    [wandb_file] = (tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb")
    wandb = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb), "leet", "inspect", "--summary", "--json", str(wandb_file)],
                         capture_output=True, text=True, timeout=120, check=True)
    s = json.loads(out.stdout)["summary"]
    assert abs(df.objective).max() < 100  # the activations of the tiny model, not -1e6
    assert s["act/mean"] == pytest.approx(df.objective.mean(), rel=1e-4, abs=1e-5)
    assert s["act/max"] == pytest.approx(df.objective.max(), rel=1e-4, abs=1e-5)
    assert s["fluency/mean"] == pytest.approx(df.fluency.mean(), rel=1e-5)
    curves = read_curves(tmp_path / "run")
    last = curves[curves.step == curves.step.max()].set_index("target_id").objective
    assert last.to_numpy() == pytest.approx(df.set_index("target_id").objective[last.index].to_numpy(), rel=1e-4,
                                            abs=1e-5)  # the curves too are the activation alone
    assert sorted(curves.step.unique()) == [0, 2]  # step 0, and the final sample the fit's end adds


# -- B: one line, never a traceback ----------------------------------------------------------------
def refused(capsys: pytest.CaptureFixture, call, *args) -> str:
    """`call(*args)` exits 2 with one line on stderr; that line."""
    capsys.readouterr()  # what came before
    with pytest.raises(SystemExit) as e:
        call(*args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("value, message", [
    ("probe.C=abc", "probe.C='abc'; valid: a finite number > 0"),
    ("layers=[a]", "layers=['a']; valid: null or a list of integers >= 0"),
    ("seed=abc", "seed='abc'; valid: an integer >= 0"),
    ("layers=[7]", "layers=[7]: layer 7 is out of range; valid: null (all) or layers in 0..1"),
    ("layers=[]", "layers=[] is an empty list"),
    ("ablate.mode=max", "ablate.mode='max'; valid: zero, mean"),
])
def test_ft_probe_values_are_refused_before_hydra(tiny_dir, tmp_path, capsys, value, message):
    from ft.cli.preflight import preflight

    err = refused(capsys, preflight, [f"model.name_or_path={tiny_dir}", value, f"hydra.run.dir={tmp_path / 'p'}"],
                  "probe")
    assert message in err
    assert not (tmp_path / "p").exists()


def test_concept_files_read_a_bom_and_refuse_other_encodings_by_line(tiny, tmp_path):
    from ft.data.concepts import load_concept

    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffword,label\nthe,1\nof,1\ncat,0\ndog,0\n".encode())
    concept = load_concept(str(bom), tiny.tokenizer)
    assert concept.words == ["the", "of", "cat", "dog"]  # the header is a header, not a word "\ufeffword"
    latin = tmp_path / "latin.csv"
    latin.write_bytes("the,1\nof,1\ncaf\xe9,0\ncat,0\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.csv': line 3 is not UTF-8 \(byte 0xe9\); valid: a UTF-8 file"):
        load_concept(str(latin), tiny.tokenizer)
    conll = tmp_path / "bad.conll"
    conll.write_bytes(b"the\t1\nof\t0\n\ncaf\xe9\t1\n")
    with pytest.raises(ConfigError, match="bad.conll': line 4 is not UTF-8"):
        load_concept(str(conll), tiny.tokenizer)


def test_a_conll_sentence_longer_than_the_model_takes_is_refused(tiny, tmp_path):
    from ft.data.concepts import load_concept
    from ft.measure.probe import concept_activations

    words = "the of and to in is that for it was on with he as you at be this".split()
    path = tmp_path / "long.conll"
    path.write_text("the\t1\nof\t0\n\n" + "\n".join(f"{w}\t{i % 2}" for i, w in enumerate(words)) + "\n")
    concept = load_concept(str(path), tiny.tokenizer)
    with pytest.raises(ConfigError, match=r"sentence 2 \(the of and to in \.\.\.\) is 20 tokens with \[CLS\] and "
                                          r"\[SEP\]; valid: sentences of at most 16 tokens"):
        concept_activations(tiny, concept, "ffn_out", [0, 1])


def damaged_copies(tiny_dir: Path, root: Path) -> dict[str, Path]:
    """The tiny model without its tokenizer, with half its weights file, with a tokenizer larger
    than its embedding matrix."""
    import shutil

    out = {name: Path(shutil.copytree(tiny_dir, root / name)) for name in ("notok", "trunc", "bigtok")}
    for f in out["notok"].iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            f.unlink()
    weights = out["trunc"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    big = VOCAB + [f"extra{i}" for i in range(20)]
    BertTokenizerFast(vocab={t: i for i, t in enumerate(big)}, do_lower_case=True).save_pretrained(out["bigtok"])
    return out


@pytest.mark.parametrize("name, message", [
    ("notok", "has no tokenizer files"), ("trunc", "model.safetensors is damaged or truncated"),
    ("bigtok", f"the tokenizer has {len(VOCAB) + 20} tokens, the embedding matrix {len(VOCAB)} rows"),
])
def test_a_damaged_model_folder_is_refused_by_name(tiny_dir, tmp_path, capsys, name, message):
    from ft.cli.preflight import preflight
    from ft.core.errors import ModelNotFoundError
    from ft.model.encoder import load_encoder

    model = damaged_copies(tiny_dir, tmp_path)[name]
    with pytest.raises(ModelNotFoundError, match=message):
        load_encoder(str(model))
    err = refused(capsys, preflight, [f"model.name_or_path={model}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert message in err and not (tmp_path / "run").exists()


# -- C: a refused command leaves nothing -----------------------------------------------------------
def hydra_writes(run_dir: Path, overrides: list[str]) -> None:
    """What Hydra writes before the job runs."""
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    with (run_dir / "train.log").open("a") as f:
        f.write("[ft] a refused job's log line\n")


def test_a_job_refused_after_hydra_leaves_no_new_run_directory(tmp_path):
    from ft.cli.undo import nothing_left_if_refused

    run_dir = tmp_path / "new" / "deeper" / "run"
    argv = ["optim.lr=0.5", f"hydra.run.dir={run_dir}"]
    with pytest.raises(SystemExit), nothing_left_if_refused(argv):
        hydra_writes(run_dir, argv[:1])
        sys.exit(2)
    assert list(tmp_path.iterdir()) == []  # the folders made for it went too


def test_a_refused_rerun_of_a_finished_run_changes_none_of_its_files(tmp_path):
    from ft.cli.undo import nothing_left_if_refused

    run_dir = tmp_path / "done"
    hydra_writes(run_dir, ["optim.lr=0.1"])
    (run_dir / "targets.parquet").write_bytes(b"results")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit), nothing_left_if_refused(["optim.lr=0.5", f"hydra.run.dir={run_dir}"]):
        hydra_writes(run_dir, ["optim.lr=0.5"])
        (run_dir / ".hydra" / "hydra.yaml").write_text("new")
        sys.exit(2)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_refused_job_in_the_default_folder_leaves_the_other_runs(tmp_path, monkeypatch):
    from ft.cli.undo import nothing_left_if_refused

    monkeypatch.chdir(tmp_path)
    old = tmp_path / "logs/train/runs/default/2020-01-01_00-00-00"
    hydra_writes(old, [])
    with pytest.raises(SystemExit), nothing_left_if_refused(["target.sites=[layer.9.ffn_out.0]"]):
        hydra_writes(tmp_path / "logs/train/runs/other/2026-01-01_00-00-00", ["target.sites=[layer.9.ffn_out.0]"])
        sys.exit(2)
    assert [p.name for p in (tmp_path / "logs/train/runs").iterdir()] == ["default"] and (old / "train.log").exists()
    with pytest.raises(SystemExit), nothing_left_if_refused([]):  # exit 1 (a crash): its files stay to read
        hydra_writes(tmp_path / "logs/train/runs/default/2026-01-01_00-00-01", [])
        sys.exit(1)
    assert len(list((tmp_path / "logs/train/runs/default").iterdir())) == 2


def test_multirun_checks_every_combination_before_any_job(tiny_dir, tmp_path, capsys):
    """input.length=8 and 2 are each fine with position=1, and position=5 with input.length=8: only
    the combination (2, 5) is out of range, and it is refused before the first job."""
    from ft.cli.preflight import preflight, variants

    argv = ["-m", f"model.name_or_path={tiny_dir}", "input.length=8,2", "position=1,5",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    assert len(variants(argv[1:], multirun=True)) == 4
    err = refused(capsys, preflight, argv)
    assert "position=5; valid 1..input.length=2" in err and not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_commands_refused_after_hydra_leave_nothing(tiny_dir, tmp_path):
    """Across the process boundary: ft.train refusing a ckpt_path that does not exist (checked by
    the run, after Hydra wrote its run directory), exit 2 with one line, and no run directory; a
    refused re-run of a finished run leaves its .hydra/overrides.yaml as it was; ft.probe's values
    are refused in one line."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    tmp_path = tmp_path / "cwd"  # the cache goes beside it
    tmp_path.mkdir()
    base = [sys.executable, "-m", "ft.train", f"model.name_or_path={tiny_dir}", "trainer.max_steps=1",
            "target.per_layer=1", "logger.wandb.mode=disabled"]

    def cli(*args: str, module: list[str] = base) -> subprocess.CompletedProcess:
        return subprocess.run([*module, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)

    bad = cli(f"ckpt_path={tmp_path / 'no.ckpt'}", f"hydra.run.dir={tmp_path / 'new' / 'bad'}")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: ckpt_path='{tmp_path / 'no.ckpt'}': {tmp_path / 'no.ckpt'} does not exist; valid: auto, last, none, "
        "a .ckpt file"]
    assert not (tmp_path / "new").exists()
    assert not (tmp_path / "bad").exists()
    assert cli(f"hydra.run.dir={tmp_path / 'done'}").returncode == 0
    files = {p: p.read_bytes() for p in (tmp_path / "done").rglob("*") if p.is_file()}
    again = cli("optim.lr=0.5", f"hydra.run.dir={tmp_path / 'done'}")
    assert again.returncode == 2 and "optim.lr=0.1" in again.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "done").rglob("*") if p.is_file()} == files
    probe = cli("probe.C=abc", module=[sys.executable, "-m", "ft.probe", f"model.name_or_path={tiny_dir}"])
    assert probe.returncode == 2 and probe.stderr.strip() == "error: probe.C='abc'; valid: a finite number > 0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done"]


# -- B: outputs that cannot be written -------------------------------------------------------------
def one_line(capsys: pytest.CaptureFixture, rc: int, code: int = 2) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == code and len(err.splitlines()) == 1 and err.startswith("error: "), (rc, err)
    return err


def test_ft_static_refuses_an_unwritable_out_before_reading_the_model(tmp_path, capsys):
    from ft.static import main
    from tests.faults import tmpfs

    (tmp_path / "file").write_text("x")
    nowhere = "/nonexistent/model"  # never loaded: the place is checked first
    err = one_line(capsys, main(["--model", nowhere, "--out", str(tmp_path / "file" / "static.parquet")]))
    assert "file is a file, not a folder; valid: a parquet file in a writable folder" in err
    err = one_line(capsys, main(["--model", nowhere, "--out", str(tmp_path)]))
    assert "it is a folder" in err
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        err = one_line(capsys, main(["--model", nowhere, "--out", str(Path(ro) / "sub" / "static.parquet")]))
        assert "is on a read-only file system" in err and not (Path(ro) / "sub").exists()


def fake_shards(root: Path, n: int = 2) -> list[Path]:
    out = []
    for i in range(n):
        (root / str(i)).mkdir(parents=True)
        (root / str(i) / "config.yaml").write_text(f"target:\n  shard: {i}\n  num_shards: {n}\n")
        out.append(root / str(i))
    return out


@pytest.mark.parametrize("where, message", [
    ("multirun", "holds the shard"), ("file", "it is a file"), ("full", "is not empty (other.txt, ...)"),
    ("in-shard", "is inside the shard"),
    ("ro", "is on a read-only file system"),
])
def test_ft_merge_refuses_an_out_it_cannot_or_must_not_write(tmp_path, capsys, where, message):
    from ft.merge import main
    from tests.faults import tmpfs

    multirun = tmp_path / "multirun"
    fake_shards(multirun)
    places = {"multirun": multirun, "file": tmp_path / "a-file", "full": tmp_path / "full",
              "in-shard": multirun / "0" / "merged"}
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "other.txt").write_text("x")
    before = sorted(p for p in tmp_path.rglob("*"))
    if where == "ro":
        with tmpfs(tmp_path / "ro", read_only=True) as ro:
            err = one_line(capsys, main([str(multirun), "-o", str(Path(ro) / "merged")]))
    else:
        err = one_line(capsys, main([str(multirun), "-o", str(places[where])]))
    assert message in err
    assert sorted(p for p in tmp_path.rglob("*") if p.name != "ro") == [p for p in before if p.name != "ro"]


# -- B: the report goes on past a diverged target and a damaged secondary file ----------------------
@pytest.fixture(scope="module")
def neuron_run(tiny_dir, tmp_path_factory) -> Path:
    from tests.test_train import run_isolated, tiny_overrides

    root = tmp_path_factory.mktemp("report_runs")
    run_isolated(compose_cfg(tiny_overrides(tiny_dir, "default", steps=4)), root / "ok", root)
    return root / "ok"


def diverged_copy(run_dir: Path, out: Path) -> Path:
    """The run with its first target diverged (objective and curve -inf, analysis vector inf),
    written with a valid manifest as a run that diverged writes it."""
    from ft.rundir.results import read_config, read_curves, read_inputs, read_summary, read_targets, write_run

    df, tensors, curves = read_targets(run_dir), read_inputs(run_dir), read_curves(run_dir)
    df.loc[0, "objective"] = -np.inf
    tensors["analysis"][0] = torch.inf
    curves.loc[curves.target_id == 0, "objective"] = -np.inf
    write_run(out, read_config(run_dir), df, tensors, read_summary(run_dir), curves, None, None)
    return out


def test_a_diverged_target_does_not_break_the_report(neuron_run, tmp_path):
    from ft.cli.report import build_report

    run = diverged_copy(neuron_run, tmp_path / "diverged")
    html = build_report([str(run)], tmp_path / "report.html", words=0).read_text()
    assert "1 diverged target(s) (inf or NaN inputs) left out" in html and 'id="fig5"' in html


def test_one_damaged_secondary_file_leaves_the_rest_of_the_report(neuron_run, tmp_path, capsys):
    import shutil

    from ft.report import main

    runs = {}
    for name in ("curves.parquet", "inputs.safetensors", "examples.parquet"):
        d = Path(shutil.copytree(neuron_run, tmp_path / "runs" / name.split(".")[0]))
        (d / name).write_bytes(b"PAR1 not a file")  # damaged (or, for examples, unreadable)
        runs[name] = d
    main([str(tmp_path / "runs"), "-o", str(tmp_path / "report.html"), "--words", "0"])
    err = capsys.readouterr().err
    html = (tmp_path / "report.html").read_text()
    for name, d in runs.items():
        assert str(d / name) in err and str(d / name) in html, name
    assert html.count("<h2>") >= 10 and "Atlas: per target" in html


def test_a_full_disk_names_the_run_directory_not_a_libraries_temporary_file(tmp_path):
    """W&B stages a table in /tmp and copies it into the run: the error names the /tmp file; the
    line must say which run directory is full and what to do."""
    import errno

    from ft.cli.preflight import storage_line
    from ft.core.integrity import StorageError

    staged = OSError(errno.ENOSPC, "No space left on device", "/tmp/tmpu1v7wandb-media/7dlpcvei.table.json")
    line = storage_line(staged, tmp_path / "run")
    assert line.startswith("cannot write /tmp/tmpu1v7wandb-media/7dlpcvei.table.json: No space left on device; ")
    assert f"the run directory {tmp_path / 'run'} is on a full disk: free space there" in line
    assert "run the same command again, it resumes" in line and "\n" not in line
    ours = StorageError(f"cannot write {tmp_path / 'run' / 'targets.parquet'}: No space left on device")  # no errno
    assert storage_line(ours, tmp_path / "run").startswith(str(ours) + "; the run directory")
    assert storage_line(OSError(errno.EIO, "I/O error", "/x"), tmp_path) == "cannot write /x: I/O error"


# -- D: processes and paths ------------------------------------------------------------------------
@pytest.mark.parametrize("folder", ["/tmp/run", "/tmp/Straße ü/run 1", "/tmp/日本/実行", "/tmp/a'b\\", "/tmp/a,b=[c]",
                                    "/tmp/$HOME `x` \"q\"", "/tmp/1e5", "/tmp/-x/ä"])
def test_the_resume_command_parses_back_for_the_shell_and_for_hydra(folder):
    """What the shell hands to ft.train from the printed command is what Hydra parses to the run
    directory and the other overrides as given."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ft.core.signals import resume_command

    overrides = ["optim.lr=0.5", "target.sites=[layer.1.ffn_out.3,layer.0.ffn_out.2]", "run_name='a b'",
                 "hydra.run.dir=/old/place"]
    words = shlex.split(resume_command("ft.train", overrides, Path(folder)))
    assert words[:3] == ["python", "-m", "ft.train"]
    parsed = OverridesParser.create().parse_overrides(words[3:])
    values = {o.key_or_group: o.value() for o in parsed}
    assert values["hydra.run.dir"] == folder  # the new place, once
    assert [o.input_line for o in parsed[:-1]] == overrides[:-1]
    assert values["optim.lr"] == 0.5 and values["run_name"] == "a b"


@pytest.mark.slow
def test_sigterm_to_a_local_launcher_stops_its_jobs_with_their_checkpoints(tiny_dir, tmp_path):
    import signal
    import time

    import psutil

    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ft.train", "-m", "hydra/launcher=local", "target.shard=range(0,2)",
                             "target.num_shards=2", f"model.name_or_path={tiny_dir}", "trainer.max_steps=1000000",
                             "target.per_layer=1", "logger.wandb.mode=disabled", "engine.stop_when_converged=false",
                             "engine.checkpoint_every_n_steps=50", f"hydra.sweep.dir={sweep}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not all((sweep / str(i) / "checkpoints" / "last.ckpt").exists() for i in (0, 1)):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    jobs = psutil.Process(proc.pid).children(recursive=True)
    assert len(jobs) >= 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: SIGTERM: ")
    assert not [j for j in jobs if j.is_running() and j.status() != psutil.STATUS_ZOMBIE]  # none left running


def test_a_refused_job_of_a_sweep_leaves_the_earlier_jobs_results(tmp_path):
    from ft.cli.undo import nothing_left_if_refused

    sweep = tmp_path / "sweep"
    argv = ["-m", "optim.lr=0.1,0.5", f"hydra.sweep.dir={sweep}"]
    with pytest.raises(SystemExit), nothing_left_if_refused(argv):
        (sweep).mkdir()
        (sweep / "multirun.yaml").write_text("hydra: {}\n")
        hydra_writes(sweep / "0", ["optim.lr=0.1"])
        (sweep / "0" / "targets.parquet").write_bytes(b"results")  # job 0 finished
        hydra_writes(sweep / "1", ["optim.lr=0.5"])  # job 1 refused
        sys.exit(2)
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "multirun.yaml"]
    assert (sweep / "0" / "targets.parquet").read_bytes() == b"results"
    argv = ["-m", "optim.lr=0.1,0.5", f"hydra.sweep.dir={tmp_path / 's2'}"]
    with pytest.raises(SystemExit), nothing_left_if_refused(argv):
        hydra_writes(tmp_path / "s2" / "0", ["optim.lr=0.1"])  # the first job refused: nothing stays
        (tmp_path / "s2" / "multirun.yaml").write_text("hydra: {}\n")
        sys.exit(2)
    assert not (tmp_path / "s2").exists()


def test_a_truncated_fluency_model_is_refused_by_name(tiny, tiny_dir, tmp_path):
    from ft.core.errors import ModelNotFoundError
    from ft.measure.fluency import build_fluency

    mlm = save_mlm(tmp_path / "mlm", VOCAB)
    weights = mlm / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelNotFoundError, match=r"search.fluency_model=.*model.safetensors is damaged or truncated"):
        build_fluency(str(mlm), tiny, _vocab(tiny), str(tiny_dir))


def test_textualize_refused_by_the_model_leaves_no_temporary_folder(tiny_dir, tmp_path, monkeypatch):
    import tempfile

    import ft

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(FtError, match="unit 999 out of range"):
        ft.textualize(sites=["layer.1.ffn_out.999"], model=str(tiny_dir), steps=1)
    assert list(tmp_path.iterdir()) == []


def test_ft_static_refuses_a_repeated_point_instead_of_repeating_every_row(tmp_path, capsys):
    from ft.static import main

    err = one_line(capsys, main(["--model", "/nonexistent", "--points", "ffn_out", "ffn_out",
                                 "--out", str(tmp_path / "s.parquet")]))
    assert "--points ffn_out ffn_out repeats 'ffn_out'; valid: each point once" in err
    assert not (tmp_path / "s.parquet").exists()


@pytest.mark.parametrize("content, message", [
    (b"name: x\nmethod: [\n", "cannot read sweep file"), (b"name: caf\xe9\n", "can't decode byte 0xe9"),
])
def test_a_sweep_file_that_does_not_read_is_one_line(tmp_path, capsys, content, message):
    from ft.sweep import SweepError, load_sweep

    path = tmp_path / "s.yaml"
    path.write_bytes(content)
    with pytest.raises(SweepError, match=message) as e:
        load_sweep(path)
    assert "\n" not in str(e.value) and "valid: a W&B sweep YAML in UTF-8" in str(e.value)


def test_a_corpus_file_that_is_not_utf8_is_refused_by_line_not_read_as_unk(tiny, tmp_path):
    from ft.data.corpus import load_corpus

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("The cat sat on the table.\n", encoding="utf-8-sig")
    assert load_corpus(str(tmp_path / "docs"), tiny.tokenizer, use_cache=False).sentences == [
        "The cat sat on the table."]  # a BOM is read transparently
    (tmp_path / "docs" / "b.txt").write_bytes("The dog.\nA caf\xe9 by the river.\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"corpus='.*b.txt': line 2 is not UTF-8 \(byte 0xe9\)"):
        load_corpus(str(tmp_path / "docs"), tiny.tokenizer, use_cache=False)
    with pytest.raises(ConfigError, match="is not a dataset saved with save_to_disk"):
        load_corpus(f"hf:{tmp_path / 'nothing'}", tiny.tokenizer, use_cache=False)


def test_a_refusal_leaves_a_concurrent_commands_new_run_directory(tmp_path, monkeypatch):
    from ft.cli.undo import nothing_left_if_refused

    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "logs/train/runs"
    with pytest.raises(SystemExit), nothing_left_if_refused(["target.sites=[layer.9.ffn_out.0]"]):
        hydra_writes(runs / "default/2026-01-01_00-00-00", ["target.sites=[layer.9.ffn_out.0]"])  # ours
        hydra_writes(runs / "default/2026-01-01_00-00-00_1", ["optim.lr=0.5"])  # another command's, just started
        sys.exit(2)
    assert [p.name for p in (runs / "default").iterdir()] == ["2026-01-01_00-00-00_1"]


@pytest.mark.parametrize("swept, message", [
    ("target.sites=[layer.1.ffn_out.3],[layer.1.ffn_out.999]", "unit 999 out of range for ffn_out; valid 0..31"),
    ("target.sites=[layer.0.head.1],[layer.0.head.2]", "head 2 out of range; valid 0..1"),
    ("target.layers=[0],[5]", "target.layers: layer 5 out of range; valid 0..1"),
    ("target.per_layer=1,33", "target.per_layer=33; valid 1..32"),
    ("target=directions target.file=x.safetensors target.site=layer.0.resid,layer.2.resid", "layer 2 out of range"),
])
def test_a_sweep_value_the_model_lacks_is_refused_before_any_job(tiny_dir, tmp_path, capsys, swept, message):
    """Checked on the model's shapes (its modules built on the meta device, no weights) in the
    preflight: no job runs before the one that would fail."""
    from ft.cli.preflight import preflight

    if "directions" in swept:
        from safetensors.torch import save_file

        save_file({"directions": torch.ones(2, 32)}, str(tmp_path / "x.safetensors"))
        swept = swept.replace("x.safetensors", str(tmp_path / "x.safetensors"))
    err = refused(capsys, preflight, ["-m", f"model.name_or_path={tiny_dir}", *swept.split(),
                                      f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert message in err and not (tmp_path / "sweep").exists()


def test_the_preflight_skeleton_has_the_loaded_models_shapes_in_every_family(tmp_path):
    """The meta-device modules the preflight checks sites against read the same layers, point
    widths and heads as the loaded model, family by family (a difference would refuse a valid
    site, or pass one the run then refuses)."""
    from ft.cli.preflight import skeleton
    from ft.model.arch import adapter
    from ft.model.encoder import load_encoder
    from ft.model.sites import POINTS, num_layers, point_width
    from tests.families import FAMILIES, build_family

    for family in FAMILIES:
        path = str(build_family(tmp_path / family, family))
        meta, real = skeleton(path, False), load_encoder(path).model
        assert meta is not None and next(meta.parameters()).is_meta, family
        assert num_layers(meta) == num_layers(real) and adapter(meta).num_heads == adapter(real).num_heads, family
        assert [point_width(meta, p) for p in POINTS] == [point_width(real, p) for p in POINTS], family


def test_run_time_input_files_are_checked_in_the_preflight(tiny_dir, tmp_path, capsys):
    """A directions file of another width and a fluency model of another vocabulary were refused
    only by the run, after Hydra wrote the run directory (and after earlier sweep jobs ran)."""
    from safetensors.torch import save_file

    from ft.cli.preflight import preflight

    save_file({"directions": torch.ones(2, 31)}, str(tmp_path / "d.safetensors"))
    err = refused(capsys, preflight, [f"model.name_or_path={tiny_dir}", "target=directions",
                                      f"target.file={tmp_path / 'd.safetensors'}", "target.site=layer.0.resid",
                                      f"hydra.run.dir={tmp_path / 'a'}"])
    assert "31" in err and "32" in err, err
    swapped = list(VOCAB)
    swapped[-1], swapped[-2] = swapped[-2], swapped[-1]
    mlm = save_mlm(tmp_path / "mlm", swapped)
    err = refused(capsys, preflight, ["-m", f"model.name_or_path={tiny_dir}", "input=tokens",
                                      f"search.fluency_model={mlm}", "search.fluency_weights=[0,1]", "seed=0,1",
                                      f"hydra.sweep.dir={tmp_path / 'b'}"])
    assert "another vocabulary than the model (2 tokens differ" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors", "mlm"]


def test_the_library_readers_take_one_path_as_one_path(tmp_path):
    """ft.rundir.results.find_runs / expand / load_runs called directly: a str or Path is one folder."""
    from ft.rundir.results import expand, find_runs, load_runs

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.yaml").write_text("x: 1\n")
    assert find_runs(str(tmp_path)) == [tmp_path / "a"] == find_runs(tmp_path)
    assert expand(str(tmp_path / "*")) == [tmp_path / "a"]
    targets, runs = load_runs(str(tmp_path / "nothing-here"))
    assert runs.empty and targets.empty


def test_the_library_target_builders_refuse_an_empty_list(tiny):
    """Called directly (not through the config schema): [] never means "sample"."""
    from ft.core.errors import TargetError
    from ft.model.vocab import Vocabulary
    from ft.targets import neuron_targets, sae_targets, target_words
    from ft.targets.sae_file import SAE

    with pytest.raises(TargetError, match="target.sites is an empty list"):
        neuron_targets(tiny.model, sites=[])
    with pytest.raises(TargetError, match="target.layers is an empty list"):
        neuron_targets(tiny.model, layers=[], fraction=0.1)
    with pytest.raises(TargetError, match="target.words is an empty list"):
        target_words(Vocabulary.from_tokenizer(tiny.tokenizer), [], 3, 0)
    H = tiny.model.config.hidden_size
    sae = SAE(torch.zeros(H, 4), torch.zeros(4), torch.zeros(4, H), torch.zeros(H))
    with pytest.raises(TargetError, match="target.latents is an empty list"):
        sae_targets(tiny.model, sae, "layer.0.resid", latents=[])
    assert len(neuron_targets(tiny.model, sites=None, fraction=0.1)) > 0  # None still samples


@pytest.mark.parametrize("existed", [False, True])
def test_undoing_a_refusal_never_removes_run_files_written_since(tmp_path, existed):
    """A refusal that comes after the run wrote results (an unknown optimized_metric is only found
    after the fit) or while another job writes there: its run directory stays; a refusal that left
    only Hydra's files is undone."""
    from ft.cli.undo import take, undo

    d = tmp_path / "run"
    if existed:
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text("- a=1\n")
    before = take([f"hydra.run.dir={d}"], "train", False)
    (d / ".hydra").mkdir(parents=True, exist_ok=True)
    (d / ".hydra" / "overrides.yaml").write_text("- a=2\n")
    (d / "train.log").write_text("log\n")
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    (d / "targets.parquet").write_bytes(b"results")
    undo(before)
    assert (d / "targets.parquet").read_bytes() == b"results" and (d / "checkpoints" / "last.ckpt").exists()
    (d / "targets.parquet").unlink()
    shutil.rmtree(d / "checkpoints")
    before = take([f"hydra.run.dir={d}"], "train", False)  # now: Hydra's files only
    (d / ".hydra" / "overrides.yaml").write_text("- a=3\n")
    undo(before)
    assert (d / ".hydra" / "overrides.yaml").read_text() == "- a=2\n"  # put back as it was
