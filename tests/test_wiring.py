"""What `train.run` wires, read back from real run directories and checked against independent
computations (tests/reference.py: plain HF modules and hooks): the selection a group run uses,
the space and position of the closest words, the read position of the objective, which restart's
rows are saved, and a resume that continues the same trajectory."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import BertModel, BertTokenizerFast

from ft.inputs import initial_embeds
from ft.rundir.results import read_curves, read_inputs, read_targets
from tests.reference import analysis_by_hand, cosine_top, frame, hf_points, site_mean, word_points
from tests.test_train import compose_cfg, run_isolated, tiny_overrides

WORDS = ["sofa", "river", "piano", "cat", "music"]
QUIET = ["logger.wandb.mode=disabled"]
RUNS = {  # name -> overrides on top of tiny_overrides(experiment)
    "relative": ("group_k10", [f"target.words=[{','.join(WORDS)}]"]),
    "absolute": ("group_k10_abs", [f"target.words=[{','.join(WORDS)}]"]),
    # several optimized tokens, read at the second, on the intermediate activations
    "act_p2": ("default", ["input.length=3", "position=2", "target.point=ffn_act"]),
    # the layer output, two tokens read at the first, three restarts per target
    "resid_restarts": ("default", ["input.length=2", "target.point=resid", "engine.restarts=3"]),
    # sites of every point in one run (the README's example shape), none of them target.point's
    "mixed": ("default", ["target.point=ffn_out", "target.sites=[layer.1.ffn_act.17,layer.0.resid.3,layer.1.resid.5]"]),
}


@pytest.fixture(scope="module")
def runs(pos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wired")
    for name, (exp, extra) in RUNS.items():
        run_isolated(compose_cfg(tiny_overrides(pos_dir, exp, steps=6) + QUIET + extra), out / name, out)
    return {name: out / name for name in RUNS}


@pytest.fixture(scope="module")
def hf(pos_dir: Path):
    """The same weights as plain HF objects, and the vocabulary (ids ascending, specials out)."""
    model = BertModel.from_pretrained(str(pos_dir)).eval()
    tok = BertTokenizerFast.from_pretrained(str(pos_dir))
    special = set(tok.all_special_ids)
    pairs = sorted((i, t) for t, i in tok.get_vocab().items() if i not in special)
    ids = torch.tensor([i for i, _ in pairs])
    return model, tok, ids, [t for _, t in pairs]


def sweep_flat(hf, point: str) -> torch.Tensor:
    """[V', layers * width]: every word alone at position 1, every layer of `point`."""
    model, tok, ids, _ = hf
    acts = word_points(model, tok, ids)[point]
    return torch.stack([a[:, 1] for a in acts], 1).flatten(1)


def site_name(flat_index: int, point: str, width: int) -> str:
    return f"layer.{flat_index // width}.{point}.{flat_index % width}"


def test_group_runs_use_the_selection_they_report(runs, hf):
    """Sites of every group = top-k of the word's activation (absolute) or of a / a_max over
    neurons with a_max > 0 (relative), recomputed from single-word forwards."""
    flat = sweep_flat(hf, "ffn_out")
    width = hf[0].config.hidden_size
    a_max = flat.max(0).values
    tokens = hf[3]
    chosen = {}
    for name, selection in (("relative", "relative"), ("absolute", "absolute")):
        df = read_targets(runs[name])
        assert list(df.target_word) == WORDS and df.selection.eq(selection).all()
        for row in df.itertuples():
            w = flat[tokens.index(row.target_word)]
            score = w if selection == "absolute" else torch.where(a_max > 0, w / a_max, -torch.inf)
            expect = {site_name(int(i), "ffn_out", width) for i in score.topk(int(row.k)).indices}
            assert set(row.sites) == expect, (selection, row.target_word)
            chosen[selection, row.target_word] = expect
    # the two selections really differ here, so a run that swapped them would fail above
    assert any(chosen["relative", w] != chosen["absolute", w] for w in WORDS)


@pytest.mark.parametrize("name,point", [("relative", "ffn_out"), ("act_p2", "ffn_act"),
                                        ("resid_restarts", "resid"), ("mixed", None)])
def test_objective_and_word_facts_recomputed(runs, hf, name, point):
    """`objective` from the saved embeds at the configured position; the most activating word
    and the target word's activation from single-word forwards (position 1, `[CLS] w [SEP]`)."""
    model, tok, _, tokens = hf
    df, t = read_targets(runs[name]), read_inputs(runs[name])
    position = 2 if name == "act_p2" else 1
    length = {"act_p2": 3, "resid_restarts": 2}.get(name, 1)
    assert t["embeds"].shape[1] == length
    points = {s.split(".")[2] for sites in df.sites for s in sites}
    assert points == ({point} if point else {"ffn_act", "resid"})
    acts = hf_points(model, inputs_embeds=frame(model, tok, t["embeds"]))
    for row in df.itertuples():
        got = float(site_mean(acts, row.sites, position)[row.Index])
        assert row.objective == pytest.approx(got, rel=1e-4, abs=1e-5), row.sites
    if length > 1:  # a run reading another position would report these instead
        other = site_mean(acts, df.sites[0], 3 - position)[0]
        assert float(other) != pytest.approx(df.objective[0], rel=1e-3)
    word_acts = word_points(model, tok, hf[2])
    for row in df.itertuples():
        per_word = site_mean(word_acts, row.sites, 1)  # [V']
        assert row.most_activating_word == tokens[int(per_word.argmax())]
        assert row.most_activating_word_activation == pytest.approx(float(per_word.max()), rel=1e-4, abs=1e-5)
        if isinstance(row.target_word, str):
            assert row.target_word_activation == pytest.approx(
                float(per_word[tokens.index(row.target_word)]), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", ["relative", "act_p2", "resid_restarts"])
def test_closest_words_are_in_the_analysis_space_at_the_read_position(runs, hf, name):
    """Saved `analysis` = LayerNorm(embeds + position + segment); closest words = top-20 by cosine
    among the words put through the same layer at the read position."""
    model, _, ids, tokens = hf
    df, t = read_targets(runs[name]), read_inputs(runs[name])
    position = 2 if name == "act_p2" else 1
    torch.testing.assert_close(t["analysis"], analysis_by_hand(model, t["embeds"], 1), rtol=1e-4, atol=1e-5)
    W = model.get_input_embeddings().weight.detach()[ids]
    words = analysis_by_hand(model, W[:, None], position)[:, 0]  # [V', H]
    at_one = analysis_by_hand(model, W[:, None], 1)[:, 0]
    elsewhere = 0
    for row in df.itertuples():
        a = t["analysis"][row.Index, position - 1]
        top, cos = cosine_top(a, words, 20)
        assert list(row.closest_words) == [tokens[i] for i in top]
        assert list(row.closest_cos) == pytest.approx([float(cos[i]) for i in top], abs=1e-5)
        assert row.analysis_norm == pytest.approx(float(a.norm()), rel=1e-5)
        assert row.raw_norm == pytest.approx(float(t["embeds"][row.Index, position - 1].norm()), rel=1e-5)
        if isinstance(row.target_word, str):
            w = tokens.index(row.target_word)
            rank = 1 + int((cos > cos[w]).sum())
            assert (row.target_word_rank, row.target_in_top1, row.target_in_top20) == (rank, rank == 1, rank <= 20)
            assert row.target_word_cos == pytest.approx(float(cos[w]), abs=1e-5)
        # what a wrong space would give: raw embeddings, or the words at position 1
        raw_top, _ = cosine_top(t["embeds"][row.Index, position - 1], W, 20)
        pos1_top, _ = cosine_top(a, at_one, 20)
        elsewhere += raw_top != top or (position != 1 and pos1_top != top)
    assert elsewhere, "the test cannot tell the spaces apart on this model"


def test_restarts_start_apart_and_the_saved_rows_are_the_kept_restarts(runs, hf, pos_dir):
    """Every restart starts from its own point (distinct objectives); the kept row is the best;
    its saved input and its curve are that restart's (the curve's first sample is the objective
    of that restart's initial input)."""
    model, tok, _, _ = hf
    df, t = read_targets(runs["resid_restarts"]), read_inputs(runs["resid_restarts"])
    assert len(df) == len(t["embeds"]) == 4 and df.target_id.tolist() == [0, 1, 2, 3]
    for row in df.itertuples():
        assert len(set(row.restart_objectives)) == 3  # three different starting points
        assert row.objective == max(row.restart_objectives)
        assert row.objective == row.restart_objectives[row.restart]
    assert df.restart.nunique() > 1 or df.restart.iloc[0] != 0  # not always restart 0: the pick shows
    acts = hf_points(model, inputs_embeds=frame(model, tok, t["embeds"]))
    for row in df.itertuples():
        assert float(site_mean(acts, row.sites, 1)[row.Index]) == pytest.approx(row.objective, rel=1e-4)
    curves = read_curves(runs["resid_restarts"])
    W = model.get_input_embeddings().weight.detach()
    for row in df.itertuples():
        e0 = initial_embeds([row.target_id + 1_000_000 * row.restart], 2, W, 0.01, 0)
        start = float(site_mean(hf_points(model, inputs_embeds=frame(model, tok, e0)), row.sites, 1)[0])
        first = curves[(curves.target_id == row.target_id) & (curves.step == 0)].objective
        assert float(first.iloc[0]) == pytest.approx(start, rel=1e-4, abs=1e-5)


def test_resume_continues_the_same_trajectory(tiny_dir, tmp_path):
    """A run stopped at its checkpoint and run again to the end equals the uninterrupted run:
    input, optimizer moments, step count, history and curves all come back from the checkpoint."""
    base = tiny_overrides(tiny_dir, "default", steps=12) + QUIET + [
        "engine.checkpoint_every_n_steps=5", "engine.stop_when_converged=false", "engine.curve_every=1"]
    run_isolated(compose_cfg(base), tmp_path / "straight", tmp_path)
    run_isolated(compose_cfg(base + ["trainer.max_steps=5"]), tmp_path / "resumed", tmp_path)
    half = read_targets(tmp_path / "resumed")
    run_isolated(compose_cfg(base), tmp_path / "resumed", tmp_path)  # resumes from step 5
    a, b = read_targets(tmp_path / "resumed"), read_targets(tmp_path / "straight")
    assert a.steps.eq(12).all() and half.steps.eq(5).all()
    assert not a.objective.equals(half.objective)  # it went on
    assert a.objective.tolist() == pytest.approx(b.objective.tolist(), rel=1e-5)
    torch.testing.assert_close(read_inputs(tmp_path / "resumed")["embeds"],
                               read_inputs(tmp_path / "straight")["embeds"], rtol=1e-5, atol=1e-6)
    ca, cb = read_curves(tmp_path / "resumed"), read_curves(tmp_path / "straight")
    pd.testing.assert_frame_equal(ca, cb, rtol=1e-5)
