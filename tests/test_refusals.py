"""Refusals a hostile tester found (issue 35), by class: A silent wrong values; B one line
instead of a traceback; C nothing left behind by a refused command; D processes and paths.
Each asserts the exact value kept, or one line, exit 2 and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

from ft.errors import ConfigError
from tests.conftest import VOCAB

ROOT = Path(__file__).resolve().parents[1]


def _vocab(enc):
    from ft.vocab import Vocabulary

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
    from ft.fluency import build_fluency

    swapped = list(VOCAB)
    swapped[-1], swapped[-2] = swapped[-2], swapped[-1]  # same size, two ids exchanged
    with pytest.raises(ConfigError, match=r"another vocabulary than the model \(2 tokens differ.*valid: a masked LM"):
        build_fluency(str(save_mlm(tmp_path / "swapped", swapped)), tiny, _vocab(tiny), str(tiny_dir))
    with pytest.raises(ConfigError, match="has no readable tokenizer"):
        build_fluency(str(save_mlm(tmp_path / "bare", None)), tiny, _vocab(tiny), str(tiny_dir))
    same = build_fluency(str(save_mlm(tmp_path / "same", VOCAB)), tiny, _vocab(tiny), str(tiny_dir))
    assert same.name == "mlm-pll:same"


def test_load_runs_reads_a_string_as_one_path_not_its_characters(tmp_path, monkeypatch):
    import ft
    import ft.results

    seen: list = []
    monkeypatch.setattr(ft.results, "load_runs", lambda paths: seen.append(paths) or "tables")
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
    from ft.results import read_targets
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
