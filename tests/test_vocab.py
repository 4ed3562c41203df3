import logging
from pathlib import Path

import pytest
import torch

from ft.measure.word_stats import vocab_objective
from ft.model.sites import Site
from ft.model.vocab import Vocabulary, analysis_vectors, cache_dir, load_or_sweep


def test_vocabulary_excludes_special_tokens(tiny):
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    assert not {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"} & set(vocab.tokens)
    assert "##ing" in vocab.tokens and "sofa" in vocab.tokens
    assert len(vocab) == tiny.vocab_size - 5


def test_sweep_matches_single_word_forward(tiny):
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    sweep = load_or_sweep(tiny, vocab, "ffn_out")
    assert sweep.shape == (len(vocab), 2, 32)
    block = tiny.model.encoder.layer[1].output.dense
    for row in (0, 7, len(vocab) - 1):
        seen = {}
        h = block.register_forward_hook(lambda m, i, o, seen=seen: seen.__setitem__("o", o) or None)
        try:
            ids = torch.tensor([[vocab.cls_id, int(vocab.ids[row]), vocab.sep_id]])
            tiny.model(input_ids=ids)
        finally:
            h.remove()
        torch.testing.assert_close(sweep[row, 1], seen["o"][0, 1])


def test_corrupt_cache_is_rebuilt_with_warning(tiny, caplog):
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    first = load_or_sweep(tiny, vocab, "ffn_out")
    files = list((cache_dir() / "vocab_sweep").glob("*ffn_out*.safetensors"))
    assert len(files) == 1
    files[0].write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING):
        again = load_or_sweep(tiny, vocab, "ffn_out")
    assert "rebuilding" in caplog.text
    torch.testing.assert_close(first, again)


def test_analysis_vectors_are_embedding_layer_output(tiny):
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    vecs = analysis_vectors(tiny, vocab, position=1)
    row = 12
    ids = torch.tensor([[vocab.cls_id, int(vocab.ids[row]), vocab.sep_id]])
    torch.testing.assert_close(vecs[row], tiny.model.embeddings(input_ids=ids)[0, 1])
    # LayerNorm output, not the raw word embedding: norm near sqrt(hidden) scale, not ~|w|
    raw = tiny.word_embeddings[int(vocab.ids[row])]
    assert not torch.allclose(vecs[row], raw)


def test_vocab_objective_is_mean_over_sites(tiny):
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    sweep = load_or_sweep(tiny, vocab, "ffn_out")
    lists = [[Site(0, "ffn_out", 1)], [Site(1, "ffn_out", 2), Site(0, "ffn_out", 4)]]
    obj = vocab_objective({"ffn_out": sweep}, tiny.model, lists)
    torch.testing.assert_close(obj[:, 0], sweep[:, 0, 1])
    torch.testing.assert_close(obj[:, 1], (sweep[:, 1, 2] + sweep[:, 0, 4]) / 2)
    # a budget of one target per chunk: the chunks join along the target axis
    small = vocab_objective({"ffn_out": sweep}, tiny.model, lists, budget_bytes=4 * len(vocab) * 2)
    assert torch.equal(small, obj) and small.shape == (len(vocab), 2)


def test_word_stats_in_chunks_equal_the_full_matrix(tiny):
    """Bounded memory changes nothing: chunked reductions == the full [V', targets] matrix."""
    from ft.measure.metrics import closest_in_chunks, closest_words
    from ft.measure.word_stats import word_stats
    from ft.model.sites import Site

    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    sweep = load_or_sweep(tiny, vocab, "ffn_out")
    lists = [[Site(layer, "ffn_out", u)] for layer in (0, 1) for u in range(0, 32, 3)]
    lists += [[Site(0, "ffn_out", 1), Site(1, "ffn_out", 2)]]
    rows = [None if i % 3 else i for i in range(len(lists))]
    full = vocab_objective({"ffn_out": sweep}, tiny.model, lists)
    stats = word_stats({"ffn_out": sweep}, tiny.model, lists, rows, budget_bytes=4 * len(vocab) * 2 * 3)
    torch.testing.assert_close(stats.max_activation, full.max(0).values)
    assert torch.equal(stats.max_row, full.max(0).indices)
    for t, w in enumerate(rows):
        assert (w is None and stats.at_target_word[t].isnan()) or float(stats.at_target_word[t]) == float(full[w, t])
    a = torch.randn(len(lists), tiny.hidden_size)
    vecs = analysis_vectors(tiny, vocab)
    top_cos, top_rows, tw_cos, tw_rank = closest_in_chunks(a, vecs, rows, n=5, chunk=4)
    cos, ref_cos, ref_rows = closest_words(a, vecs, 5)
    torch.testing.assert_close(top_cos, ref_cos)
    assert torch.equal(top_rows, ref_rows)
    for t, w in enumerate(rows):
        if w is not None:
            assert float(tw_cos[t]) == pytest.approx(float(cos[t, w]))
            assert int(tw_rank[t]) == int((cos[t] > cos[t, w]).sum()) + 1


def test_cache_keeps_points_positions_and_models_apart(tiny, tmp_path, monkeypatch):
    """One cache folder holds sweeps of two points, two positions and two models (same config,
    other weights); each is read back as its own, equal to single-word forwards by hooks, and
    each cache file arrives by rename."""
    import ft.model.vocab
    from ft.model.encoder import load_encoder
    from tests.conftest import build_tiny
    from tests.reference import word_points

    renamed = []
    real = ft.model.vocab.os.replace
    monkeypatch.setattr(ft.model.vocab.os, "replace", lambda s, d: (renamed.append(Path(d).name), real(s, d)))
    other = load_encoder(str(build_tiny(tmp_path / "other", seed=5)))
    cases = [(tiny, "ffn_out", 1), (tiny, "ffn_act", 1), (tiny, "ffn_out", 2), (other, "ffn_out", 1)]
    first = {}
    for enc, point, pos in cases:
        vocab = Vocabulary.from_tokenizer(enc.tokenizer)
        got = load_or_sweep(enc, vocab, point, position=pos)
        ref = word_points(enc.model, enc.tokenizer, vocab.ids)[point]
        torch.testing.assert_close(got, torch.stack([r[:, pos] for r in ref], 1), rtol=1e-4, atol=1e-5)
        first[enc is tiny, point, pos] = got
    files = sorted((cache_dir() / "vocab_sweep").glob("*.safetensors"))
    assert len(files) == 4 and sorted(renamed) == [f.name for f in files]

    def no_sweep(*a, **k):
        raise AssertionError("a cached sweep was recomputed")

    monkeypatch.setattr(ft.model.vocab, "sweep_vocabulary", no_sweep)
    for enc, point, pos in cases:
        again = load_or_sweep(enc, Vocabulary.from_tokenizer(enc.tokenizer), point, position=pos)
        assert torch.equal(again, first[enc is tiny, point, pos])


def test_cache_lives_under_ft_cache_dir_or_the_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FT_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("FT_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "ft"  # the README's default
