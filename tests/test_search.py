"""input=tokens: gradient-guided token search finds real tokens; its objective is their own forward."""

from __future__ import annotations

import pytest
import torch
from transformers import BertModel, BertTokenizerFast

from ft.results import read_targets
from ft.train import run
from tests.reference import hf_points, site_mean
from tests.test_train import compose_cfg


def search_cfg(tiny_dir, *extra: str) -> object:
    return compose_cfg([f"model.name_or_path={tiny_dir}", "input=tokens", "trainer.max_steps=60",
                        "trainer.accelerator=cpu", "target.per_layer=4", "+trainer.enable_progress_bar=false",
                        "logger.wandb.mode=disabled", "search.topk=8", "search.candidates=16", *extra])


def test_at_length_one_the_search_finds_the_most_activating_word(tiny, tiny_dir, tmp_path):
    """The discrete optimum of one token is the vocabulary sweep's most activating word: the search
    (proposing 8 of the vocabulary's 150 items per step, no special case for l = 1) reaches it."""
    from ft.vocab import Vocabulary

    assert len(Vocabulary.from_tokenizer(tiny.tokenizer)) > 15 * 8
    run(search_cfg(tiny_dir, "search.population=2"), tmp_path / "run")
    df = read_targets(tmp_path / "run")
    assert len(df) == 8 and df.kind.eq("neuron").all()
    gap = (df.most_activating_word_activation - df.objective) / df.most_activating_word_activation.abs()
    assert (gap <= 0.01).mean() >= 0.95, df[["objective", "most_activating_word_activation"]]
    assert (df.text == df.most_activating_word).mean() >= 0.95
    assert df.converged.all() and (df.steps < 60).all()  # stopped by patience, not by max_steps


def test_each_objective_is_a_fresh_forward_of_its_token_ids(tiny_dir, tmp_path):
    run(search_cfg(tiny_dir, "input.length=3", "trainer.max_steps=15"), tmp_path / "run")
    df = read_targets(tmp_path / "run")
    model = BertModel.from_pretrained(str(tiny_dir)).eval()
    tok = BertTokenizerFast.from_pretrained(str(tiny_dir))
    ids = torch.tensor([list(i) for i in df.token_ids])
    assert ids.shape == (8, 3)
    framed = torch.cat([torch.full((8, 1), tok.cls_token_id), ids, torch.full((8, 1), tok.sep_token_id)], 1)
    with torch.no_grad():
        acts = hf_points(model, input_ids=framed)
    for row in df.itertuples():
        assert row.objective == pytest.approx(float(site_mean(acts, row.sites, 1)[row.Index]), rel=1e-5, abs=1e-6)
        assert row.text == tok.decode(list(row.token_ids))
        assert row.retokenizes == (tok(row.text, add_special_tokens=False)["input_ids"] == list(row.token_ids))
        assert not set(row.token_ids) & set(tok.all_special_ids)  # only vocabulary items


def test_the_search_keeps_only_improving_swaps(tiny, tiny_dir, tmp_path):
    """Per row, the objective curve never goes down (a swap is kept only if it raises it)."""
    from ft.results import read_curves

    run(search_cfg(tiny_dir, "input.length=2", "trainer.max_steps=12", "engine.curve_every=1"), tmp_path / "run")
    curves = read_curves(tmp_path / "run")
    for _, c in curves.groupby("target_id"):
        v = c.sort_values("step").objective.to_numpy()
        assert (v[1:] >= v[:-1] - 1e-6).all(), v
    assert any(c.objective.max() > c.objective.min() for _, c in curves.groupby("target_id"))


def test_examples_and_the_report_put_the_searched_text_beside_the_corpus(tiny_dir, tmp_path):
    from ft.examples import run_examples
    from ft.report import build_report
    from tests.test_examples import TEXT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    run(search_cfg(tiny_dir, "input.length=2", "trainer.max_steps=8"), tmp_path / "run")
    df = read_targets(tmp_path / "run")
    examples, compare = run_examples(tmp_path / "run", corpus=str(corpus), substitutes=0)
    searched = examples[examples.kind == "searched"].set_index("target_id")
    assert len(searched) == len(df) and (examples.kind == "sentence").any()
    for row in df.itertuples():  # the searched row holds the run's own tokens and objective
        assert searched.activation[row.target_id] == pytest.approx(row.objective)
        assert list(compare.searched_text[compare.target_id == row.target_id]) == [row.text]
    html = build_report([str(tmp_path / "run")], tmp_path / "report.html").read_text()
    assert "searched text" in html and "best corpus sentence" in html
