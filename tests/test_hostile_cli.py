"""Second round of issue 35 on the command-line tools, by class: A an output that would replace or
join what the command reads; B one line instead of a traceback or argparse's usage block; C
signals: one line and 128 + signum, nothing written. Each asserts one line, the exit code and the
files as they were."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest


def fake_run(folder: Path) -> Path:
    """A folder that the readers take for a run directory (the checks below fire before any read)."""
    folder.mkdir(parents=True)
    (folder / "targets.parquet").write_bytes(b"targets")
    (folder / "config.yaml").write_text("model: {}\n")
    return folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# -- A: an output inside an input --------------------------------------------------------------------
def test_report_out_over_a_runs_targets_is_refused(tmp_path, capsys):
    from ft.report import main

    run = fake_run(tmp_path / "run")
    before = files_of(run)
    rc = main([str(run), "-o", str(run / "targets.parquet")])
    assert rc == 2
    assert "inside the input" in one_line(capsys.readouterr().err)
    assert files_of(run) == before


def test_report_out_inside_a_run_it_does_not_read_is_refused(tmp_path, capsys):
    from ft.report import main

    read, other = fake_run(tmp_path / "read"), fake_run(tmp_path / "other")
    rc = main([str(read), "-o", str(other / "report.html")])
    assert rc == 2
    assert "inside the run directory" in one_line(capsys.readouterr().err)
    assert not (other / "report.html").exists()


def test_static_out_over_the_models_weights_is_refused(tiny_dir, capsys):
    from ft.static import main

    weights = tiny_dir / "model.safetensors"
    before = weights.read_bytes()
    rc = main(["--model", str(tiny_dir), "--out", str(weights)])
    assert rc == 2
    assert "inside the input" in one_line(capsys.readouterr().err)
    assert weights.read_bytes() == before


def test_static_out_inside_a_run_is_refused(tmp_path, tiny_dir, capsys):
    from ft.static import main

    run = fake_run(tmp_path / "run")
    rc = main(["--model", str(tiny_dir), "--out", str(run / "static.parquet")])
    assert rc == 2
    assert "inside the run directory" in one_line(capsys.readouterr().err)
    assert not (run / "static.parquet").exists()


def test_export_out_inside_a_run_is_refused(tmp_path, capsys):
    from ft.export import main

    run = fake_run(tmp_path / "run")
    before = files_of(run)
    rc = main([str(run), "--format", "hf", "-o", str(run / "export")])
    assert rc == 2
    assert "inside the run directory" in one_line(capsys.readouterr().err)
    assert files_of(run) == before


# -- B: one line, exit 2 ---------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--words", "--atlas-per-run"])
def test_report_negative_counts_are_refused(tmp_path, capsys, flag):
    """--words -5 was a numpy traceback; --atlas-per-run -1 silently left each run's last target out."""
    from ft.report import main

    run = fake_run(tmp_path / "run")
    out = tmp_path / "r.html"
    rc = main([str(run), "-o", str(out), flag, "-1"])
    assert rc == 2
    assert f"{flag} -1; valid: an integer >= 0" in one_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize(("flag", "value", "named"), [("--limit", "-1", "limit=-1"), ("--limit", "0", "limit=0"),
                                                       ("--batch-size", "0", "batch_size=0"),
                                                       ("--batch-size", "-3", "batch_size=-3")])
def test_examples_bad_limit_and_batch_size_are_one_line(tmp_path, capsys, flag, value, named):
    """--limit -1 blamed an empty site list; --limit 0 meant every target; --batch-size 0 or -3 was
    a traceback after the corpus search had started."""
    from ft.examples import main

    run = fake_run(tmp_path / "run")
    before = files_of(run)
    rc = main([str(run), flag, value])
    assert rc == 2
    assert named in one_line(capsys.readouterr().err)
    assert files_of(run) == before


@pytest.mark.parametrize("module", ["report", "export", "examples", "static", "merge", "compare", "sweep", "bench",
                                    "dashboard"])
def test_argparse_errors_are_one_line(module, capsys):
    """argparse printed its usage block (3 to 6 lines) before the error."""
    import importlib

    main = importlib.import_module(f"ft.{module}").main
    with pytest.raises(SystemExit) as e:
        main(["--no-such-flag", "x"])
    assert e.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: ")
    assert f"python -m ft.{module} --help" in line


# -- C: signals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_report_signal_is_one_line_and_128_plus_signum(tmp_path, capsys, monkeypatch, signum):
    """SIGTERM killed ft.report with no word; SIGINT was a KeyboardInterrupt traceback."""
    import ft.report

    def build(*_a, **_k):
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal stops the command")

    monkeypatch.setattr(ft.report, "build_report", build)
    run = fake_run(tmp_path / "run")
    out = tmp_path / "r.html"
    before = signal.getsignal(signal.SIGTERM)
    rc = ft.report.main([str(run), "-o", str(out)])
    assert rc == 128 + signum
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"interrupted: {signal.Signals(signum).name} during python -m ft.report")
    assert "run it again with: python -m ft.report" in line
    assert not out.exists()
    assert signal.getsignal(signal.SIGTERM) is before


def test_static_signal_while_reading_leaves_no_file(tmp_path, tiny_dir, capsys, monkeypatch):
    import ft.model.encoder
    from ft.static import main

    def load(*_a, **_k):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal stops the command")

    monkeypatch.setattr(ft.model.encoder, "load_encoder", load)
    out = tmp_path / "static.parquet"
    rc = main(["--model", str(tiny_dir), "--out", str(out)])
    assert rc == 143
    assert "SIGTERM during python -m ft.static" in one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_export_signal_while_staging_leaves_nothing(tmp_path, capsys, monkeypatch):
    """The staging folder is removed: no `.out-*` sibling, no `out`."""
    import ft.cli.export_files
    import ft.export

    run = fake_run(tmp_path / "runs" / "run")
    monkeypatch.setattr(ft.export, "finished", lambda r: r)
    monkeypatch.setattr(ft.export, "distinct", lambda rs: list(rs))
    monkeypatch.setattr(ft.cli.export_files, "distinct", lambda rs: list(rs))

    def rows(*_a, **_k):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the signal stops the command")

    monkeypatch.setattr(ft.cli.export_files, "run_labels", rows)
    monkeypatch.setattr(ft.cli.export_files, "hf_rows", rows)
    out = tmp_path / "out" / "export"
    rc = ft.export.main([str(run), "--format", "hf", "-o", str(out)])
    assert rc == 130
    assert "SIGINT during python -m ft.export" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "-2"])
def test_sweep_max_runs_below_one_is_refused(tmp_path, capsys, value):
    """--max-runs 0 or -2 ran nothing, skipped the parameter checks and exited 0."""
    from ft.sweep import main

    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as e:
        main([str(Path(__file__).resolve().parents[1] / "sweeps" / "lr.yaml"), "--max-runs", value, "--out", str(out)])
    assert e.value.code == 2
    assert f"--max-runs {value}; valid: an integer >= 1" in one_line(capsys.readouterr().err)
    assert not out.exists()


def test_a_commands_own_parser_error_says_valid_once(capsys):
    """ft.bench's own checks (p.error) already name what is valid: not a second `valid:`."""
    from ft.bench import main

    with pytest.raises(SystemExit) as e:
        main(["--rounds", "0"])
    assert e.value.code == 2
    assert one_line(capsys.readouterr().err).count("valid:") == 1


def test_examples_into_an_unwritable_run_fails_before_the_work(tmp_path, capsys, monkeypatch):
    """A read-only run directory was a StorageError traceback after the whole corpus search."""
    import ft.examples

    run = fake_run(tmp_path / "run")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == run else real_access(p, mode, **k))
    monkeypatch.setattr(ft.examples, "run_examples", lambda *a, **k: pytest.fail("the work ran"))
    rc = ft.examples.main([str(run)])
    assert rc == 2
    assert "not writable" in one_line(capsys.readouterr().err)
    assert sorted(files_of(run)) == ["config.yaml", "targets.parquet"]


def test_examples_write_failure_is_one_line(tmp_path, capsys, monkeypatch):
    """A disk that fills while the examples are written: one line, exit 1, no traceback."""
    import errno

    import ft.examples
    from ft.rundir.results import storage_error

    run = fake_run(tmp_path / "run")

    def full(*_a, **_k):
        raise storage_error(run / "examples.parquet", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    monkeypatch.setattr(ft.examples, "run_examples", full)
    rc = ft.examples.main([str(run)])
    assert rc == 1
    assert "No space left on device" in one_line(capsys.readouterr().err)


@pytest.fixture(scope="module")
def two_shards(tiny_dir, tmp_path_factory):
    from ft.train import run
    from tests.test_train import compose_cfg

    root = tmp_path_factory.mktemp("hostile_shards")
    for i in range(2):
        run(compose_cfg([f"model.name_or_path={tiny_dir}", "trainer.max_steps=3", "logger.wandb.mode=disabled",
                         "+trainer.enable_progress_bar=false", "target.per_layer=2", f"target.shard={i}",
                         "target.num_shards=2"]), root / f"s{i}")
    return root


def test_merge_stopped_while_writing_leaves_no_part_and_reruns(two_shards, tmp_path, capsys, monkeypatch):
    """A SIGTERM after the kept inputs were written left `-o` holding kept/ (the message said nothing
    was written) and the same command then refused `-o` as not empty."""
    import ft.merge

    real = ft.merge.keep_shard_inputs

    def keep_then_stop(*a, **k):
        real(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ft.merge, "keep_shard_inputs", keep_then_stop)
    out = tmp_path / "merged"
    assert ft.merge.main([str(two_shards), "-o", str(out)]) == 143
    assert "SIGTERM during python -m ft.merge" in one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(ft.merge, "keep_shard_inputs", real)
    assert ft.merge.main([str(two_shards), "-o", str(out)]) == 0
    assert (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize(("rows", "said"), [
    ("cat,animal\ncat,animal\n", "'cat' is listed again"),
    ("cat,animal\ncat,verb\n", "'cat' is listed as 'verb' after 'animal'"),
    ("Cat,animal\ncat,animal\n", "'cat' is listed again"),  # one word of an uncased vocabulary
])
def test_concept_word_listed_twice_is_refused(tmp_path, tiny, rows, said):
    """A repeated word was weighed twice (and counted toward 'each label on 2 words'); one listed
    under two labels trained the probe on contradicting rows; both ran silently."""
    from ft.core.errors import ConfigError
    from ft.data.concepts import load_concept

    path = tmp_path / "c.csv"
    path.write_text(rows + "goat,animal\nsheep,animal\nhave,verb\nmake,verb\nwere,verb\n")
    with pytest.raises(ConfigError, match=said):
        load_concept(str(path), tiny.tokenizer)


def test_concept_words_each_once_still_load(tmp_path, tiny):
    from ft.data.concepts import load_concept

    path = tmp_path / "c.csv"
    path.write_text("cat,animal\ngoat,animal\nhave,verb\nmake,verb\n")
    assert load_concept(str(path), tiny.tokenizer).words == ["cat", "goat", "have", "make"]


def test_corpus_cache_tells_tokenizers_of_one_vocabulary_apart(tmp_path, monkeypatch):
    """The token-id cache was keyed by the vocabulary alone: a cased tokenizer of the same vocabulary
    got the ids an uncased one had cached ('Cat' read as 'cat'), silently."""
    from transformers import BertTokenizerFast

    import ft.data.corpus
    from tests.conftest import VOCAB

    monkeypatch.setattr(ft.data.corpus, "cache_dir", lambda: tmp_path / "cache")
    text = tmp_path / "c.txt"
    text.write_text("Cat sat on the mat.\n")
    vocab = {t: i for i, t in enumerate(VOCAB)}
    uncased = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    cased = BertTokenizerFast(vocab=vocab, do_lower_case=False)
    assert uncased("Cat", add_special_tokens=False)["input_ids"] != cased("Cat", add_special_tokens=False)["input_ids"]
    first = ft.data.corpus.load_corpus(str(text), uncased).ids
    second = ft.data.corpus.load_corpus(str(text), cased).ids
    assert second == [cased(s, add_special_tokens=False)["input_ids"] for s in ft.data.corpus.load_corpus(
        str(text), cased, use_cache=False).sentences]
    assert first != second
    assert len(list((tmp_path / "cache" / "corpus").glob("*.safetensors"))) == 2
    ft.data.corpus.load_corpus(str(text), cased)  # a tokenizer's truncation, set by each call, is not part of the key
    assert len(list((tmp_path / "cache" / "corpus").glob("*.safetensors"))) == 2


@pytest.mark.parametrize("argv", [["--entity", ""], ["--entity", "me", "--project", " "]])
def test_dashboard_empty_names_are_refused(capsys, argv):
    """An empty --entity or --project built a workspace and report for no one and exited 0."""
    from ft.dashboard import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "valid: a W&B" in one_line(capsys.readouterr().err)


def test_report_made_again_of_the_same_runs_is_the_same_file(two_shards, tmp_path, monkeypatch):
    """The page was dated by the clock: made again a minute later, the same runs gave another file."""
    import itertools
    import time as real_time

    import ft.cli.report

    ticks = itertools.count()

    class Clock:  # the clock moves a minute on each reading
        perf_counter, localtime = staticmethod(real_time.perf_counter), staticmethod(real_time.localtime)

        @staticmethod
        def time() -> float:
            return real_time.time() + 60 * next(ticks)

        @staticmethod
        def strftime(fmt: str, t=None) -> str:
            return real_time.strftime(fmt, real_time.localtime(Clock.time()) if t is None else t)

    monkeypatch.setattr(ft.cli.report, "time", Clock)
    a = ft.cli.report.build_report([str(two_shards / "s0")], tmp_path / "a.html", words=0, atlas_per_run=2)
    b = ft.cli.report.build_report([str(two_shards / "s0")], tmp_path / "b.html", words=0, atlas_per_run=2)
    assert a.read_bytes() == b.read_bytes()


def test_static_prints_no_weight_loading_bars(tiny_dir, tmp_path, capsys):
    """transformers' 'Loading weights' bars went to stderr beside ft's own lines."""
    import transformers

    from ft.static import main

    transformers.utils.logging.enable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()
    assert main(["--model", str(tiny_dir), "--out", str(tmp_path / "s.parquet"), "--top", "2"]) == 0
    assert "Loading weights" not in capsys.readouterr().err


PLAN_BERT = Path(__file__).resolve().parents[1] / "configs" / "plan" / "bert_base_uncased.json"


@pytest.mark.parametrize(("edit", "said"), [
    (lambda c: [1, 2], "a JSON list, not an object"),
    (lambda c: {**c, "num_hidden_layers": "abc"}, "num_hidden_layers"),
    (lambda c: {**c, "num_hidden_layers": -1}, "layers of 3072 FFN neurons"),
    (lambda c: {**c, "intermediate_size": 0}, "12 layers of 0 FFN neurons"),
])
def test_plan_malformed_config_is_one_line(tmp_path, edit, said):
    """A list or a string where a number goes was a traceback; -1 layers or an FFN of 0 blamed
    `--targets None`."""
    import json

    from ft.core.errors import ConfigError
    from ft.engine.plan import plan

    path = tmp_path / "config.json"
    path.write_text(json.dumps(edit(json.loads(PLAN_BERT.read_text()))))
    with pytest.raises(ConfigError, match=said):
        plan(path, steps=10, cpu_gflops=10.0)


@pytest.mark.parametrize(("kwargs", "said"), [
    ({"targets": 10**8}, "at most the model's 36,864 ffn_act neurons"),  # built 10^8 sites: hung
    ({"gpus": (0,)}, "--gpus 0"),  # ZeroDivisionError
    ({"gpu_tflops": -1.0}, "--gpu-tflops -1.0"),  # negative hours, exit 0
    ({"gpu_tflops": float("nan")}, "--gpu-tflops nan"),  # nan hours, exit 0
])
def test_plan_bad_numbers_are_refused(kwargs, said):
    from ft.core.errors import ConfigError
    from ft.engine.plan import plan

    with pytest.raises(ConfigError, match=said):
        plan(PLAN_BERT, steps=10, cpu_gflops=10.0, **kwargs)


def test_plan_still_projects(capsys):
    from ft.engine.plan import plan

    p = plan(PLAN_BERT, targets=100, steps=10, cpu_gflops=10.0)
    assert p.targets == 100
    assert p.gpu_hours > 0
