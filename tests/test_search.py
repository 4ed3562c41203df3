"""input=tokens: gradient-guided token search finds real tokens; its objective is their own forward."""

from __future__ import annotations

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from transformers import BertModel, BertTokenizerFast

from ft.rundir.results import read_targets
from ft.train import run
from tests.reference import hf_points, site_mean
from tests.test_train import compose_cfg


def search_cfg(tiny_dir, *extra: str) -> object:
    """The tiny model's token search; `extra` overrides the defaults here (a later key wins)."""
    base = [f"model.name_or_path={tiny_dir}", "input=tokens", "trainer.max_steps=60", "trainer.accelerator=cpu",
            "target.per_layer=4", "+trainer.enable_progress_bar=false", "logger.wandb.mode=disabled",
            "search.topk=8", "search.candidates=16", *extra]
    last = {o.split("=", 1)[0]: o for o in base}
    return compose_cfg(list(last.values()))


def test_at_length_one_the_search_finds_the_most_activating_word(tiny, tiny_dir, tmp_path):
    """The discrete optimum of one token is the vocabulary sweep's most activating word: the search
    (proposing 8 of the vocabulary's 150 items per step, no special case for l = 1) reaches it."""
    from ft.model.vocab import Vocabulary

    assert len(Vocabulary.from_tokenizer(tiny.tokenizer)) > 15 * 8
    run(search_cfg(tiny_dir, "search.patience=10"), tmp_path / "run")
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


def test_the_curve_is_the_best_seen_so_far(tiny, tiny_dir, tmp_path):
    """Per row, the reported objective never goes down (it is the best sequence seen, though the
    walk itself may step down), and it ends at the row's reported objective."""
    from ft.rundir.results import read_curves

    run(search_cfg(tiny_dir, "input.length=2", "trainer.max_steps=12", "engine.curve_every=1"), tmp_path / "run")
    curves, df = read_curves(tmp_path / "run"), read_targets(tmp_path / "run").set_index("target_id")
    for tid, c in curves.groupby("target_id"):
        v = c.sort_values("step").objective.to_numpy()
        assert (v[1:] >= v[:-1] - 1e-6).all(), v
        assert v[-1] == pytest.approx(df.objective[tid], rel=1e-4, abs=1e-5)
    assert any(c.objective.max() > c.objective.min() for _, c in curves.groupby("target_id"))


class Walk(pl.Callback):
    """Each row's tokens after every step."""

    def __init__(self):
        self.ids = []

    def on_train_batch_end(self, trainer, module, *_):
        self.ids.append(module.inputs.ids.detach().clone())


def test_the_walk_leaves_local_optima_never_revisits_and_keeps_its_best(tiny, tiny_dir, tmp_path):
    """Planted property of the walk: it moves to the best unvisited swap even when that is worse,
    never returns to a sequence in its memory, and the row's result is the best sequence on its
    path, by an independent input_ids forward of every sequence it visited."""
    from ft.cli.build import build_search_module, prepare_targets

    cfg = search_cfg(tiny_dir, "input.length=2", "search.topk=4", "search.candidates=6", "search.patience=3")
    targets, facts = prepare_targets(cfg, tiny)
    module = build_search_module(cfg, tiny, targets, facts)
    start = module.inputs.ids.detach().clone()
    walk = Walk()
    trainer = pl.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[walk])
    trainer.fit(module)
    result = module.result(facts.vocab.ids)
    path = torch.stack([start, *walk.ids], 1)  # [rows, steps + 1, l]
    model = BertModel.from_pretrained(str(tiny_dir)).eval()
    tok = BertTokenizerFast.from_pretrained(str(tiny_dir))
    memory = module.search.memory
    stepped_down = 0
    for row, t in enumerate(targets):
        stop = int(result.steps[row]) + 1  # positions it took (a frozen row stays put)
        p = path[row, :stop]
        framed = torch.cat([torch.full((stop, 1), tok.cls_token_id), p, torch.full((stop, 1), tok.sep_token_id)], 1)
        with torch.no_grad():
            values = site_mean(hf_points(model, input_ids=framed), [str(x) for x in t.sites], 1)  # [stop]
        seqs = [tuple(x) for x in p.tolist()]
        for i in range(1, stop):  # every move is a single swap to a sequence not in memory
            if seqs[i] != seqs[i - 1]:
                assert sum(a != b for a, b in zip(seqs[i], seqs[i - 1], strict=True)) == 1
                assert seqs[i] not in seqs[max(0, i - memory):i], (row, i)
        stepped_down += int((values[1:] < values[:-1] - 1e-6).sum())
        best = int(values.argmax())
        assert result.objectives[row] == pytest.approx(float(values[best]), rel=1e-5, abs=1e-6)
        assert float(values[seqs.index(tuple(result.token_ids[row].tolist()))]) == pytest.approx(float(values[best]))
    assert stepped_down > 0  # it left a local optimum by a worse swap at least once


def test_a_resumed_search_equals_the_uninterrupted_one(tiny_dir, tmp_path):
    """Stopped at a checkpoint and resumed: the same tokens, objectives and curves as one run
    (the walk's position, memory, best sequences and the per-step seeds all come back)."""
    from ft.rundir.results import read_curves

    base = ["input.length=2", "search.patience=50", "trainer.max_steps=14", "engine.checkpoint_every_n_steps=3",
            "engine.curve_every=1"]
    run(search_cfg(tiny_dir, *base), tmp_path / "straight")
    run(search_cfg(tiny_dir, *base, "trainer.max_steps=6"), tmp_path / "resumed")
    half = read_targets(tmp_path / "resumed")
    run(search_cfg(tiny_dir, *base), tmp_path / "resumed")
    a, b = read_targets(tmp_path / "resumed"), read_targets(tmp_path / "straight")
    assert half.steps.eq(6).all() and a.steps.eq(14).all()
    assert list(a.token_ids.map(list)) == list(b.token_ids.map(list))
    assert a.objective.tolist() == pytest.approx(b.objective.tolist(), rel=1e-6)
    pd.testing.assert_frame_equal(read_curves(tmp_path / "resumed"), read_curves(tmp_path / "straight"))


def test_examples_and_the_report_put_the_searched_text_beside_the_corpus(tiny_dir, tmp_path):
    from ft.cli.report import build_report
    from ft.measure.examples import run_examples
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


def test_candidates_do_not_depend_on_how_rows_are_chunked(tiny_dir, tmp_path):
    """A row's candidates are drawn by its target row and step, so engine.chunk_size (which a
    resumed run may change) leaves every trajectory as it was."""
    common = ["input.length=2", "search.topk=8", "search.candidates=5", "trainer.max_steps=10"]
    run(search_cfg(tiny_dir, *common, "engine.chunk_size=3"), tmp_path / "small")
    run(search_cfg(tiny_dir, *common, "engine.chunk_size=256"), tmp_path / "big")
    a, b = read_targets(tmp_path / "small"), read_targets(tmp_path / "big")
    assert list(a.token_ids.map(list)) == list(b.token_ids.map(list))
    assert a.objective.tolist() == pytest.approx(b.objective.tolist(), rel=1e-5)


def test_rows_draw_their_candidates_independently(tiny_dir, tmp_path, monkeypatch):
    """Each row (target x member) draws its own candidate noise: the rows the search passes to
    `row_noise` are distinct, and their draws differ, while one row's draw depends only on (seed,
    step, row). Identical noise for every row would also be chunk-invariant, so the chunking test
    alone cannot tell."""
    import ft.engine.search as search

    drawn: list[tuple[list[int], torch.Tensor]] = []
    real = search.row_noise

    def spy(rows, n, step, seed):
        out = real(rows, n, step, seed)
        drawn.append((rows.tolist(), out))
        return out

    monkeypatch.setattr(search, "row_noise", spy)
    run(search_cfg(tiny_dir, "input.length=2", "search.candidates=5", "search.population=2",
                   "trainer.max_steps=3", "target.sites=[layer.0.ffn_out.1,layer.1.ffn_out.2]"), tmp_path / "run")
    rows = [r for call, _ in drawn for r in call]
    assert len(set(rows)) == 4  # 2 targets x 2 members, each its own row in every step
    for call, noise in drawn:
        orders = {tuple(noise[i].argsort()[:5].tolist()) for i in range(len(call))}
        assert len(orders) == len(call), "two rows drew the same candidates"
    one = real(torch.tensor([3]), 16, 2, 0)
    assert torch.equal(one, real(torch.tensor([0, 3, 7]), 16, 2, 0)[1:2])  # a row's draw ignores its neighbours
    assert not torch.equal(one, real(torch.tensor([3]), 16, 3, 0))  # the step matters
    assert not torch.equal(one, real(torch.tensor([3]), 16, 2, 1))  # so does the seed
