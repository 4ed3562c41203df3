"""Fluency (ft.measure.fluency): each score equals an independent computation; the search's frontier
moves toward fluent text as its weight grows; PEZ's projected input stands for real tokens."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from ft.core.errors import ConfigError
from ft.measure.fluency import BigramPrior, MaskedLMFluency, build_fluency, check_weights
from ft.rundir.results import read_frontier, read_inputs, read_targets
from ft.train import run
from tests.reference import hf_points, site_mean
from tests.test_search import search_cfg
from tests.test_train import compose_cfg

CORPUS = ("The cat sat on the table. The dog sat by the door. A bird was in the garden.\n"
          "The cat was on the chair. She said the music was like water. The dog had a fish.\n")


def corpus_ids(tok) -> list[list[int]]:
    from ft.data.corpus import split_sentences

    return tok(split_sentences(CORPUS), add_special_tokens=False)["input_ids"]


def bigram_by_hand(sentences, V, cls, sep):
    """log p(b | a) by the documented formula, counted with plain Python."""
    pairs, ctx, nxt = Counter(), Counter(), Counter()
    for s in sentences:
        seq = [cls, *s, sep]
        for a, b in zip(seq[:-1], seq[1:], strict=True):
            pairs[a, b] += 1
            ctx[a] += 1
            nxt[b] += 1
    n = sum(nxt.values())

    def logp(a, b):
        uni = (nxt[b] + 1) / (n + V)
        if ctx[a] == 0:
            return math.log(uni)
        return math.log(0.5 * pairs[a, b] / ctx[a] + 0.5 * uni)
    return logp


def test_the_bigram_prior_is_the_documented_formula_and_its_swap_gains_are_exact(tiny):
    tok, V = tiny.tokenizer, tiny.word_embeddings.shape[0]
    sents = corpus_ids(tok)
    prior = BigramPrior(sents, V, tok.cls_token_id, tok.sep_token_id, "test")
    logp = bigram_by_hand(sents, V, tok.cls_token_id, tok.sep_token_id)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (6, 3), generator=g)
    ids[0] = torch.tensor(tok.convert_tokens_to_ids(["the", "cat", "sat"]))  # seen bigrams
    for row, score in zip(ids.tolist(), prior.score(ids).tolist(), strict=True):
        seq = [tok.cls_token_id, *row, tok.sep_token_id]
        want = sum(logp(a, b) for a, b in zip(seq[:-1], seq[1:], strict=True)) / len(row + [0])
        assert score == pytest.approx(want, rel=1e-5)
    assert prior.score(ids[:1]) > prior.score(ids[1:]).max()  # corpus text beats random tokens
    gains = prior.swap_gains(ids[:2])  # [2, 3, V]
    for r in range(2):
        for i in range(3):
            swapped = ids[r].repeat(V, 1)
            swapped[:, i] = torch.arange(V)
            torch.testing.assert_close(gains[r, i], prior.score(swapped) - prior.score(ids[r:r + 1]),
                                       rtol=1e-4, atol=1e-5)


def test_the_masked_lm_pseudo_log_likelihood_equals_a_masked_forward_per_position(tiny, tmp_path):
    tok = tiny.tokenizer
    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=16)).eval()
    flu = MaskedLMFluency(mlm, tok.mask_token_id, tok.cls_token_id, tok.sep_token_id, "tiny", batch_rows=5)
    ids = torch.randint(5, len(tok), (4, 3), generator=torch.Generator().manual_seed(1))
    want = []
    for row in ids.tolist():
        terms = []
        for i in range(3):
            x = [tok.cls_token_id, *row, tok.sep_token_id]
            x[i + 1] = tok.mask_token_id
            with torch.no_grad():
                lp = mlm(input_ids=torch.tensor([x])).logits[0, i + 1].log_softmax(-1)
            terms.append(float(lp[row[i]]))
        want.append(sum(terms) / 3)
    assert flu.score(ids).tolist() == pytest.approx(want, rel=1e-5)
    gains = flu.swap_gains(ids)
    assert gains.shape == (4, 3, len(tok))
    assert gains.gather(2, ids[..., None]).abs().max() == 0  # no swap, no change
    # the swapped position's own term, exactly: its masked distribution, relative to the current token
    x = [tok.cls_token_id, *ids[0].tolist(), tok.sep_token_id]
    x[2] = tok.mask_token_id
    with torch.no_grad():
        lp = mlm(input_ids=torch.tensor([x])).logits[0, 2].log_softmax(-1)
    torch.testing.assert_close(gains[0, 1], (lp - lp[ids[0, 1]]) / 3, rtol=1e-4, atol=1e-5)
    # a checkpoint with a head is found as the analysed model's own; a bare encoder is not
    mlm.save_pretrained(tmp_path / "mlm")
    tok.save_pretrained(tmp_path / "mlm")
    own = build_fluency("auto", tiny, _vocab(tiny), str(tmp_path / "mlm"))
    assert own.name == "mlm-pll:mlm"
    assert build_fluency("auto", tiny, _vocab(tiny), str(tmp_path / "bare")).name.startswith("bigram:")


def _vocab(enc):
    from ft.model.vocab import Vocabulary

    return Vocabulary.from_tokenizer(enc.tokenizer)


def test_a_higher_fluency_weight_never_gives_a_less_fluent_best_text(tiny, tiny_dir, tmp_path):
    """Planted: at l = 1 with every token a candidate, each weight's text is the exhaustive
    argmax of activation + weight x prior (computed here independently), so its fluency cannot
    fall as the weight grows."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    weights = [0, 0.001, 0.003, 0.01, 0.1, 1]
    run(search_cfg(tiny_dir, "target.per_layer=2", "search.topk=200", "search.candidates=200",
                   "search.patience=3", f"search.fluency_weights=[{','.join(map(str, weights))}]",
                   f"search.fluency_model=bigram:{corpus}"), tmp_path / "run")
    frontier = read_frontier(tmp_path / "run")
    assert len(frontier) == 4 * len(weights) and set(frontier.fluency_weight) == set(weights)
    assert frontier.fluency_source.eq(f"bigram:{corpus}").all()
    tok = tiny.tokenizer
    vocab = _vocab(tiny)
    logp = bigram_by_hand(corpus_ids(tok), len(tok), tok.cls_token_id, tok.sep_token_id)
    allowed = vocab.ids
    framed = torch.stack([torch.full_like(allowed, tok.cls_token_id), allowed,
                          torch.full_like(allowed, tok.sep_token_id)], 1)
    model = BertModel.from_pretrained(str(tiny_dir)).eval()
    with torch.no_grad():
        acts = hf_points(model, input_ids=framed)
    prior = torch.tensor([(logp(tok.cls_token_id, w) + logp(w, tok.sep_token_id)) / 2 for w in allowed.tolist()])
    targets = read_targets(tmp_path / "run").set_index("target_id")
    moved = 0
    for tid, rows in frontier.groupby("target_id"):
        act = site_mean(acts, list(targets.sites[tid]), 1)
        rows = rows.sort_values("fluency_weight")
        for r in rows.itertuples():
            best = int((act + r.fluency_weight * prior).argmax())
            assert list(r.token_ids) == [int(allowed[best])], (tid, r.fluency_weight)
            assert r.fluency == pytest.approx(float(prior[best]), rel=1e-5)
        assert (rows.fluency.diff().dropna() >= -1e-9).all(), rows
        moved += rows.fluency.iloc[-1] > rows.fluency.iloc[0]
    assert moved >= 1  # the weights reach far enough to change a text


def test_bad_fluency_settings_are_refused_in_one_line(tiny_dir, tmp_path):
    for bad in ([-1], [0, 0], "x", [], [float("nan")]):
        with pytest.raises(ConfigError, match="search.fluency_weights"):
            check_weights(bad)
    assert check_weights(0.5) == [0.5]
    with pytest.raises(ConfigError, match="search.fluency_model='/nope'.*valid: auto"):
        run(search_cfg(tiny_dir, "search.fluency_model=/nope"), tmp_path / "run")
    assert not (tmp_path / "run" / "targets.parquet").exists()


def test_pez_runs_on_its_projection_and_reports_real_tokens(tiny, tiny_dir, tmp_path):
    """input=projected: every forward sees word embeddings only; the saved continuous copy's
    nearest tokens (cosine) are the reported tokens, whose fresh input_ids forward is the objective."""
    run(compose_cfg([f"model.name_or_path={tiny_dir}", "input=projected", "input.length=2", "trainer.max_steps=20",
                     "trainer.accelerator=cpu", "target.per_layer=2", "+trainer.enable_progress_bar=false",
                     "logger.wandb.mode=disabled", "optim.lr=0.1"]), tmp_path / "run")
    df, inputs = read_targets(tmp_path / "run"), read_inputs(tmp_path / "run")
    W = tiny.word_embeddings.detach().float()
    ids = torch.tensor([list(i) for i in df.token_ids])
    torch.testing.assert_close(inputs["embeds"], W[ids])
    allowed = _vocab(tiny).ids
    cos = torch.nn.functional.normalize(inputs["continuous"], dim=-1) @ torch.nn.functional.normalize(
        W[allowed], dim=-1).T
    assert torch.equal(allowed[cos.argmax(-1)], ids)
    assert not torch.allclose(inputs["continuous"], inputs["embeds"])  # the continuous copy moved off the words
    tok = tiny.tokenizer
    framed = torch.cat([torch.full((len(df), 1), tok.cls_token_id), ids, torch.full((len(df), 1), tok.sep_token_id)], 1)
    model = BertModel.from_pretrained(str(tiny_dir)).eval()
    with torch.no_grad():
        acts = hf_points(model, input_ids=framed)
    for row in df.itertuples():
        assert row.objective == pytest.approx(float(site_mean(acts, list(row.sites), 1)[row.Index]), rel=1e-5,
                                              abs=1e-6)


def test_the_frontier_and_the_texts_fluency_reach_wandb(tiny_dir, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    summary = run(search_cfg(tiny_dir, "logger.wandb.mode=offline", "target.per_layer=1", "input.length=2",
                             "trainer.max_steps=4", "search.fluency_weights=[0,1]"), tmp_path / "run")
    df, frontier = read_targets(tmp_path / "run"), read_frontier(tmp_path / "run")
    assert summary["final/fluency_mean"] == pytest.approx(df.fluency.mean())
    [wandb_file] = (tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb")
    wandb = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb), "leet", "inspect", "--summary", "--json", str(wandb_file)],
                         capture_output=True, text=True, timeout=120, check=True)
    s = json.loads(out.stdout)["summary"]
    assert s["results/frontier"]["nrows"] == len(frontier) == 2 * len(df)
    assert s["results/texts"]["nrows"] == len(df)
    assert s["final/fluency_mean"] == pytest.approx(df.fluency.mean())


def test_a_masked_lm_scores_the_search_and_its_frontier(tiny, tiny_dir, tmp_path):
    """search.fluency_model=DIR: the frontier's fluency is that MLM's pseudo-log-likelihood of
    each text, recomputed here one masked position at a time."""
    tok = tiny.tokenizer
    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=16)).eval()
    mlm.save_pretrained(tmp_path / "mlm")
    tok.save_pretrained(tmp_path / "mlm")
    run(search_cfg(tiny_dir, "target.per_layer=1", "input.length=2", "trainer.max_steps=5",
                   f"search.fluency_model={tmp_path / 'mlm'}", "search.fluency_weights=[0,1]"), tmp_path / "run")
    frontier = read_frontier(tmp_path / "run")
    assert len(frontier) == 4 and frontier.fluency_source.eq("mlm-pll:mlm").all()
    for r in frontier.itertuples():
        terms = []
        for i in range(2):
            x = [tok.cls_token_id, *r.token_ids, tok.sep_token_id]
            x[i + 1] = tok.mask_token_id
            with torch.no_grad():
                terms.append(float(mlm(input_ids=torch.tensor([x])).logits[0, i + 1].log_softmax(-1)[r.token_ids[i]]))
        assert r.fluency == pytest.approx(sum(terms) / 2, rel=1e-4)
    with pytest.raises(ConfigError, match="has 7 tokens, the model"):
        small = BertForMaskedLM(BertConfig(vocab_size=7, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                           intermediate_size=8))
        small.save_pretrained(tmp_path / "small")
        build_fluency(str(tmp_path / "small"), tiny, _vocab(tiny), str(tiny_dir))
