"""Hostile cases of silent wrong data in the library and run-directory layer (issue 35, round 2)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ft.targets.sae_demo import demo_sae
from ft.targets.sae_file import CFG, load_sae

SENTENCES_A = "the cat sat on the sofa. the dog ran to the river. a bird is on the roof.\n" * 20
SENTENCES_B = "music piano violin guitar. apple banana cherry grape lemon mango.\n" * 20


def test_the_demo_sae_cache_is_keyed_by_its_corpus(tiny, tmp_path):
    """Two demo SAEs of the same model, site and settings but other corpora are other SAEs: the
    second is never the first one served from the cache (with the first corpus in its cfg.json)."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(SENTENCES_A)
    b.write_text(SENTENCES_B)
    fa, _ = demo_sae(tiny, 1, "resid", corpus=str(a), steps=5)
    wa = load_sae(fa).W_enc.clone()
    fb, _ = demo_sae(tiny, 1, "resid", corpus=str(b), steps=5)
    assert json.loads((fb / CFG).read_text())["ft_corpus"] == str(b)
    assert not torch.equal(load_sae(fb).W_enc, wa)


def test_the_demo_sae_cache_is_keyed_by_its_corpus_content(tiny, tmp_path):
    """The same corpus path with other sentences in it is another corpus."""
    a = tmp_path / "a.txt"
    a.write_text(SENTENCES_A)
    fa, _ = demo_sae(tiny, 1, "resid", corpus=str(a), steps=5)
    wa = load_sae(fa).W_enc.clone()
    a.write_text(SENTENCES_B)
    fb, _ = demo_sae(tiny, 1, "resid", corpus=str(a), steps=5)
    assert not torch.equal(load_sae(fb).W_enc, wa)


def tiny_run(tiny_dir: Path, *extra: str, steps: int = 2):
    from tests.test_train import compose_cfg

    return compose_cfg([f"model.name_or_path={tiny_dir}", f"trainer.max_steps={steps}", "trainer.accelerator=cpu",
                        "+trainer.enable_progress_bar=false", "callbacks.nearest.every_n_steps=2", "print_rows=0",
                        *extra])


def test_a_resumed_demo_sae_run_keeps_the_demo_sae_it_started_with(tiny, tiny_dir, tmp_path):
    """A demo-SAE run resumed after its cached demo SAE changed (another training, an edit) is
    scored with the SAE its first steps used, or refused; never the new one kept in its place."""
    import pytest

    from ft.core.errors import FtError
    from ft.rundir.kept import kept
    from ft.train import run

    a = tmp_path / "a.txt"
    a.write_text(SENTENCES_A)
    demo = ["target=sae", f"target.demo.corpus={a}", "target.demo.steps=5", "target.num_latents=3"]
    run(tiny_run(tiny_dir, *demo), tmp_path / "run", tiny)
    first = load_sae(kept(tmp_path / "run", "sae")).W_enc.clone()
    cache = next((tmp_path / "cache" / "sae").iterdir())
    sae = load_sae(cache)
    sae.W_enc = sae.W_enc * 2
    sae.save(cache, json.loads((cache / CFG).read_text()))
    try:
        run(tiny_run(tiny_dir, *demo, steps=4), tmp_path / "run", tiny)
    except FtError as e:
        assert "sae" in str(e)
        return
    assert torch.equal(load_sae(kept(tmp_path / "run", "sae")).W_enc, first)
    from ft.rundir.results import read_targets

    assert set(read_targets(tmp_path / "run").sae_path) == {str(cache)}  # named as a straight run names it
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(FtError, match="demo SAE"):  # from elsewhere: the cache's changed SAE is refused
        run(tiny_run(tiny_dir, *demo, f"ckpt_path={ckpt}", steps=6), tmp_path / "other", tiny)


def test_a_start_over_retires_the_examples_of_the_old_results(tiny, tiny_dir, tmp_path):
    """examples.parquet (written after a run, by ft.examples) belongs to the results it was made
    from: a start over with other targets (ckpt_path=none) leaves no examples of the old units
    for the report to show under the new ones' target ids."""
    from ft.measure.examples import run_examples
    from ft.train import run

    neurons = ["target.sites=[layer.0.ffn_act.3]"]
    run(tiny_run(tiny_dir, *neurons), tmp_path / "run", tiny)
    run_examples(tmp_path / "run", substitutes=0)
    assert (tmp_path / "run" / "examples.parquet").exists()
    run(tiny_run(tiny_dir, "target.sites=[layer.1.ffn_act.7]", "ckpt_path=none"), tmp_path / "run", tiny)
    assert not (tmp_path / "run" / "examples.parquet").exists()


def test_results_extended_by_a_resume_retire_the_examples_of_the_old_results(tiny, tiny_dir, tmp_path):
    """A resume that runs more steps commits new inputs and objectives: the examples of the old
    ones (their searched text, the optimized value they compare to) go with them."""
    from ft.measure.examples import run_examples
    from ft.train import run

    neurons = ["target.sites=[layer.0.ffn_act.3]"]
    run(tiny_run(tiny_dir, *neurons), tmp_path / "run", tiny)
    run_examples(tmp_path / "run", substitutes=0)
    run(tiny_run(tiny_dir, *neurons, steps=4), tmp_path / "run", tiny)
    assert not (tmp_path / "run" / "examples.parquet").exists()


def test_a_start_over_retires_the_resume_log_of_the_old_run(tiny, tiny_dir, tmp_path):
    """resume_log.jsonl records what resumes of the run changed; after a start over (ckpt_path=none)
    it must not describe the new run with the old run's changes."""
    from ft.train import run

    neurons = ["target.sites=[layer.0.ffn_act.3]"]
    run(tiny_run(tiny_dir, *neurons), tmp_path / "run", tiny)
    run(tiny_run(tiny_dir, *neurons, steps=3), tmp_path / "run", tiny)
    assert (tmp_path / "run" / "resume_log.jsonl").exists()
    run(tiny_run(tiny_dir, *neurons, "ckpt_path=none"), tmp_path / "run", tiny)
    assert not (tmp_path / "run" / "resume_log.jsonl").exists()


def test_a_checkpoint_of_another_run_directory_retires_this_directorys_results(tiny, tiny_dir, tmp_path,
                                                                                monkeypatch):
    """ckpt_path=FILE of another run continued into a directory holding results of other settings:
    from the moment its config is written, no reader sees the old results beside the new config
    (a crash before the new results are committed leaves no targets of lr 0.1 under lr 0.5)."""
    import pytest

    import ft.cli.run
    from ft.core.errors import FtError
    from ft.rundir.results import read_config, read_targets
    from ft.train import run

    neurons = ["target.sites=[layer.0.ffn_act.3]"]
    run(tiny_run(tiny_dir, *neurons, "optim.lr=0.1"), tmp_path / "x", tiny)
    run(tiny_run(tiny_dir, *neurons, "optim.lr=0.5"), tmp_path / "y", tiny)

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(ft.cli.run, "keep_inputs", crash)
    ckpt = tmp_path / "y" / "checkpoints" / "last.ckpt"
    with pytest.raises(RuntimeError):
        run(tiny_run(tiny_dir, *neurons, "optim.lr=0.5", f"ckpt_path={ckpt}", steps=4), tmp_path / "x", tiny)
    assert read_config(tmp_path / "x").optim.lr == 0.5
    with pytest.raises(FtError):
        read_targets(tmp_path / "x")


def test_a_model_changed_in_memory_is_not_recorded_as_the_folder_it_was_loaded_from(tiny_dir, tmp_path):
    """ft.textualize(model=<a loaded model>) whose weights were changed after loading: the run
    must not name (and fingerprint) the unchanged folder as its model, or every later reader
    (ft.examples, exports, resume) scores the targets with other weights than the run used."""
    import ft
    from ft.model.encoder import load_encoder
    from ft.rundir.kept import model_to_load
    from ft.rundir.results import read_config

    enc = load_encoder(str(tiny_dir))
    with torch.no_grad():
        enc.model.encoder.layer[0].intermediate.dense.weight.mul_(3)
    result = ft.textualize(sites=["layer.0.ffn_act.3"], model=enc.model, tokenizer=enc.tokenizer, steps=2,
                           run_dir=tmp_path / "run")
    recorded = model_to_load(result.run_dir, read_config(result.run_dir).model.name_or_path)
    if Path(recorded).exists():  # whatever it names must be the weights the run used
        again = load_encoder(recorded).model.encoder.layer[0].intermediate.dense.weight
        assert torch.equal(again, enc.model.encoder.layer[0].intermediate.dense.weight)


def test_a_resumed_gumbel_run_continues_its_noise(tiny, tiny_dir, tmp_path):
    """input=gumbel draws its noise from the global torch generator: a run resumed from its
    checkpoint (here: extended from 3 to 6 steps) must continue that stream, as the run would have
    gone on, not draw the first steps' noise again (a silently other run than the straight one)."""
    from ft.rundir.results import read_inputs
    from ft.train import run

    g = ["target.sites=[layer.0.ffn_act.3,layer.1.ffn_out.5]", "input=gumbel", "input.anneal_steps=6",
         "logger.wandb.mode=disabled"]  # (W&B's nearest-words table: the next test)
    run(tiny_run(tiny_dir, *g, steps=3), tmp_path / "a", tiny)
    run(tiny_run(tiny_dir, *g, steps=6), tmp_path / "a", tiny)
    run(tiny_run(tiny_dir, *g, steps=6), tmp_path / "b", tiny)
    assert torch.equal(read_inputs(tmp_path / "a")["embeds"], read_inputs(tmp_path / "b")["embeds"])


def test_the_nearest_words_table_does_not_change_a_gumbel_run(tiny, tiny_dir, tmp_path):
    """The W&B nearest-words table (a report, every callbacks.nearest.every_n_steps) must read the
    inputs without drawing gumbel noise: a run logged to W&B gives the inputs of the same run
    without W&B, and its table shows the noise-free input."""
    from ft.rundir.results import read_inputs
    from ft.train import run

    g = ["target.sites=[layer.0.ffn_act.3,layer.1.ffn_out.5]", "input=gumbel"]
    run(tiny_run(tiny_dir, *g, "logger.wandb.mode=offline", steps=5), tmp_path / "a", tiny)
    run(tiny_run(tiny_dir, *g, "logger.wandb.mode=disabled", steps=5), tmp_path / "b", tiny)
    assert torch.equal(read_inputs(tmp_path / "a")["embeds"], read_inputs(tmp_path / "b")["embeds"])


def test_the_console_table_tells_apart_units_whose_labels_share_a_prefix(tiny, tiny_dir, tmp_path, capsys):
    """Two term expressions that differ only after their 28th character are two rows the console
    table must tell apart (it cut every label at 28 characters)."""
    from ft.rundir.results import read_summary, read_targets
    from ft.rundir.tracking import format_table
    from ft.train import run

    specs = "target.specs=['layer.1.ffn_out.5-0.5*layer.0.ffn_act.7','layer.1.ffn_out.5-0.5*layer.0.ffn_act.8']"
    run(tiny_run(tiny_dir, "target=terms", specs), tmp_path / "run", tiny)
    df = read_targets(tmp_path / "run")
    lines = format_table(df, 10, read_summary(tmp_path / "run")).splitlines()[1:3]
    assert "layer.0.ffn_act.7" in lines[0]
    assert "layer.0.ffn_act.8" in lines[1]


def test_the_wandb_targets_table_names_each_unit():
    """The W&B results table carries the `label` column: SAE latents of one site are told apart."""
    import pandas as pd

    from ft.rundir.tracking import wandb_targets_table

    df = pd.DataFrame({"target_id": [0, 1], "kind": ["sae", "sae"], "sites": [["layer.1.resid"]] * 2,
                       "label": ["layer.1.resid:sae.3", "layer.1.resid:sae.9"], "target_word": [None, None],
                       "objective": [1.0, 2.0], "most_activating_word": ["a", "b"],
                       "most_activating_word_activation": [0.5, 0.6], "closest_words": [["a"], ["b"]],
                       "closest_cos": [[0.9], [0.8]]})
    assert list(wandb_targets_table(df)["label"]) == ["layer.1.resid:sae.3", "layer.1.resid:sae.9"]


def test_a_result_file_the_manifest_does_not_list_is_refused(tiny, tiny_dir, tmp_path, monkeypatch):
    """A start over commits a manifest of its config alone; a targets.parquet put back beside it
    (an rsync without --delete, a restored backup) is not this run's result, and read_targets
    must refuse it rather than read it unverified as a file 'written after the run'."""
    import shutil

    import pytest

    import ft.cli.run
    from ft.core.errors import FtError
    from ft.rundir.results import read_targets
    from ft.train import run

    d = tmp_path / "run"
    run(tiny_run(tiny_dir, "target.sites=[layer.0.ffn_act.3]"), d, tiny)
    shutil.copy(d / "targets.parquet", tmp_path / "old.parquet")

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(ft.cli.run, "keep_inputs", crash)
    with pytest.raises(RuntimeError):
        run(tiny_run(tiny_dir, "target.sites=[layer.1.ffn_act.9]", "ckpt_path=none"), d, tiny)
    shutil.copy(tmp_path / "old.parquet", d / "targets.parquet")
    with pytest.raises(FtError):
        read_targets(d)


def test_a_corpus_file_with_a_colon_in_its_name_is_fingerprinted(tiny_dir, tmp_path):
    """Only an hf:PATH:COLUMN spec has a column after a colon: a plain corpus file whose name has a
    colon (c:v2.txt) is still the file the run reads, so its content is recorded (and a change of
    it refused on resume) for target=clusters and for the fluency bigram corpus."""
    from ft.cli.resume import input_sources

    corpus = tmp_path / "c:v2.txt"
    corpus.write_text(SENTENCES_A)
    clusters = input_sources(tiny_run(tiny_dir, "target=clusters", f"target.corpus='{corpus}'"))
    assert clusters.get("corpus") == corpus
    tokens = input_sources(tiny_run(tiny_dir, "input=tokens", f"search.fluency_model='bigram:{corpus}'"))
    assert tokens.get("fluency_corpus") == corpus


def test_a_hub_model_whose_cached_snapshot_changed_is_refused_on_resume(tiny_dir, tmp_path, monkeypatch):
    """model.name_or_path=org/name (the Hugging Face cache): the snapshot the run read is
    fingerprinted like a model folder, so a resume after the cache moved to another revision
    (other weights under the same name) is refused, and later readers load the snapshot it read."""
    import shutil

    import pytest

    from ft.core.errors import FtError
    from ft.rundir.kept import model_to_load
    from ft.train import run
    from tests.conftest import build_tiny

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    shutil.copytree(tiny_dir, repo / "snapshots" / "aaa")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaa")
    import huggingface_hub.constants
    import transformers.utils.hub

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    for name in ("HF_HUB_CACHE", "TRANSFORMERS_CACHE", "PYTORCH_PRETRAINED_BERT_CACHE", "PYTORCH_TRANSFORMERS_CACHE"):
        if hasattr(transformers.utils.hub, name):
            monkeypatch.setattr(transformers.utils.hub, name, str(cache))
    hub = ["model.name_or_path=org/tiny", "target.sites=[layer.0.ffn_act.3]", "logger.wandb.mode=disabled"]
    run(tiny_run(tiny_dir, *hub), tmp_path / "run")
    build_tiny(repo / "snapshots" / "bbb", seed=5)  # a new revision: same name, other weights
    (repo / "refs" / "main").write_text("bbb")
    assert model_to_load(tmp_path / "run", "org/tiny") == str(repo / "snapshots" / "aaa")
    with pytest.raises(FtError, match="model"):
        run(tiny_run(tiny_dir, *hub, steps=4), tmp_path / "run")


def test_a_start_over_logs_to_a_new_wandb_run(tiny, tiny_dir, tmp_path):
    """The W&B run id kept in the run directory lets a resume continue its W&B run; a start over
    (ckpt_path=none) is another run and must not continue the old one's history (W&B would drop
    the new run's steps below the old run's last step and mix both runs' settings)."""
    from ft.rundir.tracking import WANDB_ID
    from ft.train import run

    neurons = ["target.sites=[layer.0.ffn_act.3]", "logger.wandb.mode=offline"]
    run(tiny_run(tiny_dir, *neurons), tmp_path / "run", tiny)
    first = (tmp_path / "run" / WANDB_ID).read_text()
    run(tiny_run(tiny_dir, *neurons, steps=3), tmp_path / "run", tiny)
    assert (tmp_path / "run" / WANDB_ID).read_text() == first  # a resume continues it
    run(tiny_run(tiny_dir, *neurons, "ckpt_path=none"), tmp_path / "run", tiny)
    assert (tmp_path / "run" / WANDB_ID).read_text() != first
