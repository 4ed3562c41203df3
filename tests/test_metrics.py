from functools import partial

import pytest
import torch

from ft.engine.module import TextualizationModule
from ft.inputs import build_input
from ft.measure.metrics import VocabFacts, evaluate, summarize
from ft.model.vocab import Vocabulary, analysis_vectors, load_or_sweep
from ft.targets import group_targets, neuron_targets


@pytest.fixture
def finished(tiny, tmp_path):
    """Two neurons and two groups optimized for a few steps, and their evaluation."""
    import pytorch_lightning as pl

    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    sweep = load_or_sweep(tiny, vocab, "ffn_out")
    targets = neuron_targets(tiny.model, sites=["layer.0.ffn_out.5", "layer.1.ffn_out.9"])
    targets += group_targets(tiny.model, vocab, tiny.tokenizer, sweep, k=6, words=["sofa", "river"])
    lists = [t.sites for t in targets]
    facts = VocabFacts.build(vocab, analysis_vectors(tiny, vocab), {"ffn_out": sweep}, tiny.model, targets)
    inputs = build_input("embedding", range(len(targets)), tiny.word_embeddings)
    m = TextualizationModule(tiny.model, lists, inputs, partial(torch.optim.Adam, lr=0.05),
                             vocab.cls_id, vocab.sep_id, stop_when_converged=False)
    pl.Trainer(max_steps=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               default_root_dir=str(tmp_path)).fit(m)
    df, tensors = evaluate(m.result(vocab.ids), targets, facts, tiny, 1)
    return tiny, vocab, targets, df, tensors, summarize(df)


def single_word_objective(tiny, vocab, sites, word_row):
    """Brute force, one forward per word: mean of the sites' activations at position 1."""
    seen = {}
    hooks = [tiny.model.encoder.layer[layer].output.dense.register_forward_hook(
        lambda m, i, o, layer=layer: seen.__setitem__(layer, o[0, 1]) or None) for layer in range(2)]
    try:
        ids = torch.tensor([[vocab.cls_id, int(vocab.ids[word_row]), vocab.sep_id]])
        tiny.model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return float(sum(seen[s.layer][s.unit] for s in sites) / len(sites))


def test_reported_objective_matches_fresh_forward(finished):
    tiny, vocab, targets, df, tensors, _ = finished
    e = tensors["embeds"]
    W = tiny.word_embeddings
    seq = torch.cat([W[vocab.cls_id].expand(len(e), 1, -1), e, W[vocab.sep_id].expand(len(e), 1, -1)], 1)
    out = tiny.model(inputs_embeds=seq, output_hidden_states=True)
    for t, target in enumerate(targets):
        vals = []
        for s in target.sites:
            blk = tiny.model.encoder.layer[s.layer]
            attn = blk.attention(out.hidden_states[s.layer][t : t + 1])[0]
            vals.append(blk.output.dense(blk.intermediate(attn))[0, 1, s.unit])
        assert df.objective[t] == pytest.approx(float(sum(vals) / len(vals)), rel=1e-4, abs=1e-5)
    # analysis = the embedding layer's output of the saved input
    torch.testing.assert_close(tensors["analysis"], tiny.model.embeddings(inputs_embeds=seq)[:, 1:2])


def test_most_activating_word_by_brute_force(finished):
    tiny, vocab, targets, df, _, _ = finished
    for t in (0, 2):
        acts = [single_word_objective(tiny, vocab, targets[t].sites, r) for r in range(len(vocab))]
        best = max(range(len(acts)), key=acts.__getitem__)
        assert df.most_activating_word[t] == vocab.tokens[best]
        assert df.most_activating_word_activation[t] == pytest.approx(acts[best], rel=1e-4)
    w = vocab.tokens.index("sofa")
    assert df.target_word_activation[2] == pytest.approx(
        single_word_objective(tiny, vocab, targets[2].sites, w), rel=1e-4)


def test_closest_words_and_target_rank_by_brute_force(finished):
    tiny, vocab, targets, df, tensors, _ = finished
    vecs = analysis_vectors(tiny, vocab)
    for t in range(len(targets)):
        a = tensors["analysis"][t, 0]
        cos = [float(torch.dot(a, v) / (a.norm() * v.norm())) for v in vecs]
        order = sorted(range(len(cos)), key=lambda i: -cos[i])
        assert list(df.closest_words[t]) == [vocab.tokens[i] for i in order[:20]]
        assert df.closest_cos[t][0] == pytest.approx(cos[order[0]], abs=1e-5)
        assert df.analysis_norm[t] == pytest.approx(float(a.norm()), rel=1e-5)
        if targets[t].target_word:
            w = vocab.tokens.index(targets[t].target_word)
            rank = 1 + sum(c > cos[w] for c in cos)
            assert df.target_word_rank[t] == rank
            assert df.target_word_cos[t] == pytest.approx(cos[w], abs=1e-5)
            assert df.target_in_top1[t] == (rank == 1) and df.target_in_top20[t] == (rank <= 20)
        else:
            assert df.target_word_rank[t] is None or df.target_word_rank.isna()[t]


def test_summary_aggregates(finished):
    _, _, _, df, _, s = finished
    assert s["final/activation_mean"] == pytest.approx(df.objective.mean(), rel=1e-5)
    ratio = df.objective.mean() / df.most_activating_word_activation.mean()
    assert s["final/activation_ratio"] == pytest.approx(ratio, rel=1e-5)  # ratio of means
    assert s["final/closest_cos_mean"] == pytest.approx(df.closest_cos.map(lambda c: c[0]).mean(),
                                                        rel=1e-5)
    groups = df[df.kind == "group"]
    assert s["group/target_top20_rate"] == pytest.approx(groups.target_in_top20.astype(float).mean())
    assert s["group/target_cos_mean"] == pytest.approx(groups.target_word_cos.mean(), rel=1e-5)
    assert df.steps.eq(15).all() and not df.diverged.any()
