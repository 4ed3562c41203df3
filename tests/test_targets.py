import pytest
import torch

from ft.core.errors import TargetError
from ft.model.vocab import Vocabulary, load_or_sweep
from ft.targets import LATIN_WORD, group_targets, neuron_targets, pick_words, select_group


@pytest.fixture
def setup(tiny):
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    return tiny, vocab, load_or_sweep(tiny, vocab, "ffn_out")


def test_neuron_sample_per_layer_is_seeded(tiny):
    a = neuron_targets(tiny.model, fraction=0.25, seed=3)
    b = neuron_targets(tiny.model, fraction=0.25, seed=3)
    c = neuron_targets(tiny.model, fraction=0.25, seed=4)
    assert [t.sites for t in a] == [t.sites for t in b] != [t.sites for t in c]
    assert [t.layer for t in a].count(0) == 8 and [t.layer for t in a].count(1) == 8
    assert len({str(t.sites[0]) for t in a}) == 16


def test_explicit_sites_and_errors(tiny):
    ts = neuron_targets(tiny.model, sites=["layer.1.ffn_out.4"])
    assert ts[0].layer == 1 and ts[0].kind == "neuron"
    with pytest.raises(TargetError, match="per_layer=99"):
        neuron_targets(tiny.model, per_layer=99)
    with pytest.raises(TargetError, match="layers"):
        neuron_targets(tiny.model, per_layer=2, layers=[])
    with pytest.raises(TargetError, match="fraction=1.5"):
        neuron_targets(tiny.model, per_layer=None, fraction=1.5)


def test_absolute_group_is_topk_of_word_activations(setup):
    tiny, vocab, sweep = setup
    [g] = group_targets(tiny.model, vocab, tiny.tokenizer, sweep, k=5, selection="absolute",
                        words=["sofa"])
    row = vocab.tokens.index("sofa")
    acts = sweep[row]
    picked = torch.tensor([acts[s.layer, s.unit] for s in g.sites])
    assert torch.allclose(picked.sort(descending=True).values, acts.flatten().topk(5).values)
    assert g.target_word == "sofa" and g.k == 5 and g.selection == "absolute"


def test_the_log_counts_the_neurons_relative_selection_skipped(setup, caplog):
    import logging

    tiny, vocab, sweep = setup
    sweep = sweep.clone()
    sweep[:, 0, :5] = -1.0  # five neurons never fire positively
    kw = dict(model=tiny.model, vocab=vocab, tokenizer=tiny.tokenizer, sweep=sweep, k=3, words=["sofa"])
    with caplog.at_level(logging.INFO, logger="ft.targets"):
        group_targets(**kw, selection="absolute")
        assert "skipped" not in caplog.text
        group_targets(**kw, selection="relative")
    assert "relative selection skipped 5 neurons with a_max <= 0" in caplog.text


def test_relative_group_divides_by_amax_and_skips_nonpositive():
    word = torch.tensor([1.0, 0.5, 0.4, -3.0])
    a_max = torch.tensor([10.0, 0.5, -1.0, 2.0])  # neuron 2 has a_max <= 0: skipped
    idx, skipped = select_group(word, a_max, 2, "relative")
    assert skipped == 1 and idx.tolist() == [1, 0]  # 0.5/0.5=1.0, 1/10=0.1
    with pytest.raises(TargetError, match=r"k=4; valid 1\.\.3"):
        select_group(word, a_max, 4, "relative")


def test_word_and_k_errors(setup):
    tiny, vocab, sweep = setup
    kw = dict(model=tiny.model, vocab=vocab, tokenizer=tiny.tokenizer, sweep=sweep)
    with pytest.raises(TargetError, match="'zebra' is not in the vocabulary"):
        group_targets(**kw, k=3, words=["zebra"])
    with pytest.raises(TargetError, match=r"'sofas' tokenizes to \['sofa', '##s'\]"):
        group_targets(**kw, k=3, words=["sofas"])
    with pytest.raises(TargetError, match=r"k=65; valid 1\.\.64"):
        group_targets(**kw, k=65, words=["sofa"])
    with pytest.raises(TargetError, match="k=0"):
        group_targets(**kw, k=0, words=["sofa"])
    with pytest.raises(TargetError, match="selection='best'"):
        group_targets(**kw, k=3, selection="best", words=["sofa"])


def test_pick_words_random_plus_frequent(setup):
    tiny, vocab, _ = setup
    words = pick_words(vocab, num_random=10, num_frequent=5, seed=1)
    assert len(words) == len(set(words)) == 15
    assert all(LATIN_WORD.match(w) for w in words)
    from wordfreq import top_n_list

    assert set(words[10:]) <= set(top_n_list("en", 300))
    assert words == pick_words(vocab, num_random=10, num_frequent=5, seed=1)


def test_bounds_are_inclusive_and_messages_name_the_value(setup):
    """k and per_layer accept exactly 1..width (both ends), refuse one past them, and refuse a
    non-integer k by name; every message names the value and what is valid."""
    tiny, vocab, sweep = setup
    kw = dict(model=tiny.model, vocab=vocab, tokenizer=tiny.tokenizer, sweep=sweep, words=["sofa"])
    assert len(group_targets(**kw, k=64, selection="absolute")[0].sites) == 64
    assert len(group_targets(**kw, k=1)[0].sites) == 1
    for bad in ("3", 2.5, None):
        with pytest.raises(TargetError, match=rf"target.k={bad!r}; valid 1\.\.64 \(all neurons of ffn_out\)"):
            group_targets(**kw, k=bad)
    assert [len(neuron_targets(tiny.model, per_layer=n)) for n in (1, 32)] == [2, 64]
    with pytest.raises(TargetError, match=r"target.per_layer=33; valid 1\.\.32"):
        neuron_targets(tiny.model, per_layer=33)
    assert len(neuron_targets(tiny.model, per_layer=None, fraction=1.0)) == 64
    with pytest.raises(TargetError, match=r"target.selection='best'; valid: \['absolute', 'relative'\]"):
        select_group(torch.ones(4), torch.ones(4), 1, "best")
    with pytest.raises(TargetError, match=r"layer 2 out of range; valid 0\.\.1"):
        neuron_targets(tiny.model, per_layer=1, layers=[0, 2])


def test_group_words_follow_the_seed(setup):
    """Without target.words, the words are pick_words' for the run's seed (not a fixed one)."""
    tiny, vocab, sweep = setup
    kw = dict(model=tiny.model, vocab=vocab, tokenizer=tiny.tokenizer, sweep=sweep, k=3,
              num_random=4, num_frequent=2)
    for seed in (0, 7):
        got = [g.target_word for g in group_targets(**kw, seed=seed)]
        assert got == pick_words(vocab, 4, 2, seed=seed)
    assert [g.target_word for g in group_targets(**kw, seed=0)] != [g.target_word for g in group_targets(**kw, seed=7)]
