"""Dataset examples: corpus, corpus search, minimal activating examples, local search."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from ft.core.errors import ConfigError, ModelNotFoundError
from ft.data.corpus import load_corpus, split_sentences
from ft.examples import main
from ft.measure.examples import TargetScorer, corpus_search, is_stopword, passes, prune
from ft.model.sites import Site, SiteReader
from ft.model.substitutes import MaskedLM, NearestEmbeddings, build_substitutes
from ft.train import run
from tests.test_train import compose_cfg, tiny_overrides

TEXT = """The cat was on the table. A dog sat by the door with the mouse!
Music from the piano and the violin filled the house. The horse and the cow ate grass in the garden?
Water ran down the river by the bank. He said there was money in the bank.
The bird and the fish were in the water. She will write a long number on the wall."""
SITES = [[Site(1, "ffn_out", 3)], [Site(0, "ffn_act", 5)], [Site(1, "ffn_out", 7), Site(0, "ffn_out", 1)]]


@pytest.fixture()
def corpus_file(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return p


def hook_activation(tiny, sites, ids: list[int]) -> torch.Tensor:
    """Independent reference: [T] activation of a target at every token, via HF hooks."""
    tok = tiny.tokenizer
    seq = torch.tensor([[tok.cls_token_id, *ids, tok.sep_token_id]])
    acts = SiteReader(tiny.model, {s.point for s in sites}, max(s.layer for s in sites), slice(None)).read(
        input_ids=seq)
    return torch.stack([acts[s.point][0, s.layer, 1:-1, s.unit] for s in sites]).mean(0)


def test_sentence_splitter_keeps_abbreviations_and_quotes():
    got = split_sentences('Mr. Smith came home. He said "no." Then J. Doe left!\nWhy? 3 more.')
    assert got == ["Mr. Smith came home.", 'He said "no."', "Then J. Doe left!", "Why?", "3 more."]


def test_corpus_sources_and_cache(tiny, corpus_file, tmp_path, caplog):
    c = load_corpus(str(corpus_file), tiny.tokenizer)
    assert len(c) == 8 and c.sentences[0] == "The cat was on the table."
    assert c.ids[0] == tiny.tokenizer(c.sentences[0], add_special_tokens=False)["input_ids"]
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("The cat sat.")
    (folder / "sub" / "b.txt").write_text("The dog ran. The cow ate.")
    assert load_corpus(str(folder), tiny.tokenizer).sentences == ["The cat sat.", "The dog ran.", "The cow ate."]
    for cache in (Path(tmp_path) / "cache" / "corpus").glob("*.safetensors"):
        cache.write_bytes(b"garbage")  # a corrupt cache is rebuilt with a warning, never an error
    assert load_corpus(str(corpus_file), tiny.tokenizer).ids == c.ids
    assert "unreadable" in caplog.text
    with pytest.raises(ConfigError, match="not found"):
        load_corpus(str(tmp_path / "missing.txt"), tiny.tokenizer)


def test_packaged_corpus_is_real_english(tiny):
    c = load_corpus("packaged:lee", tiny.tokenizer)
    assert len(c) > 2000 and c.sentences[0].startswith("Hundreds of people")


def test_corpus_search_is_the_max_over_positions_and_sentences(tiny, corpus_file):
    corpus = load_corpus(str(corpus_file), tiny.tokenizer)
    scorer = TargetScorer(tiny, SITES, batch_size=3)  # several batches: the running top-n must merge
    scores, sent, anchor = corpus_search(scorer, corpus, top_n=3)
    for j, sites in enumerate(SITES):
        per_sentence = [hook_activation(tiny, sites, ids) for ids in corpus.ids]
        maxima = torch.tensor([float(a.max()) for a in per_sentence])
        expect, order = maxima.topk(3)
        torch.testing.assert_close(scores[j], expect, rtol=1e-4, atol=1e-5)
        assert int(sent[j, 0]) == int(order[0])
        assert int(anchor[j, 0]) == int(per_sentence[int(order[0])].argmax())


def test_pruning_keeps_the_threshold_and_returns_the_shortest_span(tiny, corpus_file):
    corpus = load_corpus(str(corpus_file), tiny.tokenizer)
    scorer = TargetScorer(tiny, SITES)
    checked = 0
    for j in range(len(SITES)):
        def measure(seqs, anchors, j=j):
            return scorer.at(seqs, anchors, j)

        for ids in corpus.ids:
            acts = hook_activation(tiny, SITES[j], ids)
            a = int(acts.argmax())
            ref = float(acts[a])
            for drop, window in ((0.6, 0), (0.3, 1)):
                span = prune(measure, ids, a, drop, window, lambda i, ids=ids: i % 2 == 0 or i == len(ids))
                value = float(hook_activation(tiny, SITES[j], ids[span.start : span.end])[a - span.start])
                assert span.activation == pytest.approx(value, rel=1e-4, abs=1e-5)
                assert passes(value, ref, drop + 1e-4)  # never below the threshold
                assert span.start <= a - window or span.start == 0
                assert span.end >= min(a + 1 + window, len(ids))
                # brute force: no shorter end passes, then no later start passes
                assert span.start % 2 == 0 and (span.end % 2 == 0 or span.end == len(ids))  # allowed cuts only
                for e in range(min(a + 1 + window, len(ids)), span.end, 1):
                    if e % 2:
                        continue
                    assert not passes(float(hook_activation(tiny, SITES[j], ids[:e])[a]), ref, drop - 1e-4)
                for s in range(span.start + 2, max(a - window, 0) + 1, 2):
                    v = float(hook_activation(tiny, SITES[j], ids[s : span.end])[a - s])
                    assert not passes(v, ref, drop - 1e-4)
                checked += span.end - span.start < len(ids)
    assert checked > 0  # some spans really were pruned


def test_prune_on_a_known_function():
    """Tokens 0..9; a span [s, e) scores e - cost*s (10 for the whole): the answer is known."""
    tokens = list(range(10))
    for cost, expect in ((3.0, (0, 5, 5.0)), (0.5, (2, 5, 4.0))):
        def measure(seqs, anchors, cost=cost):
            return torch.tensor([s[-1] + 1 - cost * s[0] for s in seqs])

        span = prune(measure, tokens, anchor=4, max_drop=0.6)  # keep >= 4
        assert (span.start, span.end, span.activation) == expect


def test_local_search_labels_follow_thresholds_and_mlm_path(tiny, tiny_dir, corpus_file, tmp_path):
    torch.manual_seed(0)
    cfg = tiny.model.config
    mlm_dir = tmp_path / "mlm"
    BertForMaskedLM(BertConfig(vocab_size=cfg.vocab_size, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32)).save_pretrained(mlm_dir)
    subs = build_substitutes(str(mlm_dir), tiny, str(tiny_dir))
    assert isinstance(subs, MaskedLM) and subs.name == f"mlm:{mlm_dir}"
    auto = build_substitutes("auto", tiny, str(tiny_dir))  # the tiny BertModel has no MLM head
    assert isinstance(auto, NearestEmbeddings)
    own = build_substitutes("auto", tiny, str(mlm_dir))  # an analysed model with its own MLM head
    assert isinstance(own, MaskedLM) and own.name == f"mlm:{mlm_dir}"
    with pytest.raises(ModelNotFoundError):
        build_substitutes(str(tmp_path / "nope"), tiny, str(tiny_dir))
    small = tmp_path / "small"
    BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(small)
    with pytest.raises(ConfigError, match="vocabulary"):
        build_substitutes(str(small), tiny, str(tiny_dir))

    tokens = tiny.tokenizer.convert_ids_to_tokens(list(range(tiny.vocab_size)))
    ids = tiny.tokenizer("the horse and the cow ate in the garden", add_special_tokens=False)["input_ids"]
    scorer = TargetScorer(tiny, SITES)
    from ft.measure.examples import local_search

    for provider in (subs, auto):
        for j in range(len(SITES)):
            acts = hook_activation(tiny, SITES[j], ids)
            a = int(acts.argmax())
            found = local_search(lambda s, an, j=j: scorer.at(s, an, j), ids, a, provider, tokens, 4, 0.4, 0.7)
            for ex in found:
                v = float(hook_activation(tiny, SITES[j], ex["tokens"])[a])
                assert ex["activation"] == pytest.approx(v, rel=1e-4, abs=1e-5)
                drop = (float(acts[a]) - v) / abs(float(acts[a]))
                assert ex["drop"] == pytest.approx(drop, rel=1e-3, abs=1e-4)
                assert (drop < 0.4) if ex["kind"] == "positive" else (drop > 0.7)
                changed = [i for i, (x, y) in enumerate(zip(ids, ex["tokens"], strict=True)) if x != y]
                assert len(changed) == 1 and not is_stopword(tokens[ids[changed[0]]])


def test_examples_cli_writes_the_table_and_feeds_the_report(tiny_dir, corpus_file, tmp_path, monkeypatch, capsys):
    cfg = compose_cfg(tiny_overrides(tiny_dir, "default", steps=10))
    run(cfg, tmp_path / "run")
    capsys.readouterr()
    assert main([str(tmp_path / "run"), "--corpus", str(corpus_file), "--top-n", "2", "--substitutes", "3"]) == 0
    printed = capsys.readouterr().out
    sites = [s[0] for s in pd.read_parquet(tmp_path / "run" / "targets.parquet").sites]
    assert printed.count("layer.") >= 2 and all(s in printed for s in sites[:2])  # sites, not target ids
    df = pd.read_parquet(tmp_path / "run" / "examples.parquet")
    targets = pd.read_parquet(tmp_path / "run" / "targets.parquet")
    assert set(df.target_id) == set(targets.target_id)
    assert {"sentence", "ngram", "mae"} <= set(df.kind)
    assert (df[df.kind == "sentence"].groupby("target_id").size() == 2).all()
    best = df[(df.kind == "sentence") & (df["rank"] == 0)].set_index("target_id").activation
    mae = df[df.kind == "mae"].set_index("target_id").activation
    assert (mae >= best - 0.6 * best.abs() - 1e-4).all()
    summary = json.loads((tmp_path / "run" / "examples_summary.json").read_text())
    assert summary["examples/best_sentence_mean"] == pytest.approx(best.mean(), rel=1e-5)
    # the same W&B run (same id) got the tables and the summary
    run_id = (tmp_path / "run" / "wandb_id").read_text().strip()
    files = sorted((tmp_path / "run").glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # the training run and its resumption by ft.examples
    wandb = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb), "leet", "inspect", "--summary", "--json", str(files[-1])],
                         capture_output=True, text=True, timeout=120, check=True)
    s = json.loads(out.stdout)["summary"]
    assert s["examples/best_sentence_mean"] == pytest.approx(best.mean(), rel=1e-5)
    assert s["examples/examples"]["_type"] == "table-file" and s["examples/comparison"]["nrows"] == len(targets)
    from ft.cli.report import build_report

    html = build_report([str(tmp_path / "run")], tmp_path / "r.html", words=0).read_text()
    assert "anchor_token" in html and df.text.iloc[0] in html
    assert main([str(tmp_path / "run"), "--corpus", str(tmp_path / "nope.txt")]) == 2  # one-line error


def test_a_batch_of_unequal_lengths_masks_padding_and_sep(tiny):
    """Each sequence of a mixed-length batch scores as it does alone: its tokens only ([CLS],
    [SEP] and padding never count), and a target that peaks at [SEP] is not read there."""
    scorer = TargetScorer(tiny, [[Site(layer, "ffn_out", u)] for layer in (0, 1) for u in range(32)])
    texts = ["the cat", "music from the piano and the violin filled the house", "water ran"]
    seqs = [tiny.tokenizer(s, add_special_tokens=False)["input_ids"] for s in texts]
    out = scorer.batch(seqs)  # [B, T, targets]
    sep_peaks = 0
    for b, ids in enumerate(seqs):
        alone = scorer.batch([ids])[0]
        torch.testing.assert_close(out[b, : len(ids)], alone, rtol=1e-4, atol=1e-5)
        assert torch.isinf(out[b, len(ids):]).all() and (out[b, len(ids):] < 0).all()
        seq = torch.tensor([[tiny.tokenizer.cls_token_id, *ids, tiny.tokenizer.sep_token_id]])
        acts = SiteReader(tiny.model, {"ffn_out"}, 1, slice(None)).read(input_ids=seq)["ffn_out"][0]  # [L, S, 32]
        tokens_max = acts[:, 1:-1].max(1).values.flatten()  # [64]: layer-major, as the targets
        sep_peaks += int((acts[:, -1].flatten() > tokens_max).sum())
        torch.testing.assert_close(out[b, : len(ids)].max(0).values, tokens_max, rtol=1e-4, atol=1e-5)
    assert sep_peaks > 0  # some targets peak at [SEP]: counting it as a token would show
    # corpus search over one mixed-length batch: each sentence's score is its own tokens' max
    from ft.data.corpus import Corpus

    scores, sent, _ = corpus_search(scorer, Corpus("mixed", ["a", "b", "c"], seqs), top_n=3)
    for j in range(scores.shape[0]):
        for s, i in zip(scores[j].tolist(), sent[j].tolist(), strict=True):
            assert s == pytest.approx(float(out[i, :, j].max()), rel=1e-5)
