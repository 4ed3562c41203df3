"""Objectives that compose: terms over sites, directions, the regularizers, and the row state."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from safetensors.torch import save_file

from ft.core.errors import TargetError
from ft.data.directions import load_directions
from ft.engine.module import TextualizationModule
from ft.engine.state import RowState
from ft.inputs import build_input
from ft.model.sites import Site
from ft.model.vocab import Vocabulary
from ft.targets import direction_targets, terms_targets
from ft.targets.expressions import parse
from ft.targets.objectives import InputNorm, Readout, direction, mean, neuron

SPEC = "layer.1.ffn_out.5 - 0.5 * layer.0.ffn_act.7 + 2 * layer.1.resid.3"


def hf_points(model, seq: torch.Tensor, position: int = 1) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, point): [rows, width]} at `position`, read straight from the HF BERT's own modules
    (forward hooks on them, and its hidden states), independent of ft's readers."""
    got: dict = {}
    handles = []
    for i, block in enumerate(model.encoder.layer):
        handles.append(block.intermediate.register_forward_hook(
            lambda _m, _i, out, i=i: got.__setitem__((i, "ffn_act"), out[:, position])))
        handles.append(block.output.dense.register_forward_hook(
            lambda _m, _i, out, i=i: got.__setitem__((i, "ffn_out"), out[:, position])))
    try:
        out = model(inputs_embeds=seq, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    for i in range(len(model.encoder.layer)):
        got[(i, "resid")] = out.hidden_states[i + 1][:, position]
    return got


def module_for(tiny, readouts, fast, **kw):
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    inputs = build_input("embedding", range(len(readouts)), tiny.word_embeddings, seed=3, length=2)
    return TextualizationModule(tiny.model, readouts, inputs, partial(torch.optim.Adam, lr=0.1),
                                vocab.cls_id, vocab.sep_id, fast_forward=fast, **kw)


@pytest.mark.parametrize("fast", [True, False], ids=["lean", "hooked"])
def test_terms_objective_is_the_expression_over_fresh_site_values(tiny, fast):
    specs = [SPEC, "layer.0.ffn_out.2", "(layer.1.resid.0 + layer.1.resid.1) / 2 - -layer.0.resid.4"]
    targets = terms_targets(tiny.model, specs)
    m = module_for(tiny, [t.readout for t in targets], fast)
    with torch.no_grad():
        got = m()
        seq = m.reading(slice(None)).seq
        acts = hf_points(tiny.model, seq)
    a = lambda layer, point, unit: acts[(layer, point)][:, unit]  # noqa: E731
    expect = torch.stack([
        a(1, "ffn_out", 5) - 0.5 * a(0, "ffn_act", 7) + 2 * a(1, "resid", 3),
        a(0, "ffn_out", 2),
        (a(1, "resid", 0) + a(1, "resid", 1)) / 2 + a(0, "resid", 4),
    ], 1)
    rows = torch.arange(3)
    scale = float(expect.abs().max())
    torch.testing.assert_close(got, expect[rows, rows], rtol=0, atol=1e-5 * scale)
    assert targets[0].reads == ["layer.1.ffn_out.5", "layer.0.ffn_act.7", "layer.1.resid.3"]
    assert targets[0].layer is None and targets[1].layer == 0  # one layer read: the row has a layer


@pytest.mark.parametrize("fast", [True, False], ids=["lean", "hooked"])
def test_direction_is_h_dot_v_from_the_models_own_modules(tiny, tmp_path, fast):
    torch.manual_seed(0)
    H, inter = tiny.model.config.hidden_size, tiny.model.config.intermediate_size
    save_file({"directions": torch.randn(3, H)}, str(tmp_path / "d.safetensors"),
              metadata={"names": json.dumps(["up", "down", "side"])})
    d = load_directions(tmp_path / "d.safetensors")
    targets = direction_targets(tiny.model, d, ["layer.1.resid", "layer.0.ffn_out"])
    save_file({"directions": torch.randn(2, inter)}, str(tmp_path / "wide.safetensors"))
    targets += direction_targets(tiny.model, load_directions(tmp_path / "wide.safetensors"), "layer.1.ffn_act")
    assert [t.direction for t in targets] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert [t.direction_name for t in targets[:3]] == ["up", "down", "side"] and targets[6].direction_name is None
    assert targets[0].reads == ["layer.1.resid"] and targets[0].layer == 1 and targets[0].spec == "layer.1.resid@0"
    m = module_for(tiny, [t.readout for t in targets], fast)
    with torch.no_grad():
        got = m()
        acts = hf_points(tiny.model, m.reading(slice(None)).seq)
    wide = load_directions(tmp_path / "wide.safetensors").vectors
    expect = torch.cat([
        (acts[(1, "resid")][:3] * d.vectors).sum(1), (acts[(0, "ffn_out")][3:6] * d.vectors).sum(1),
        (acts[(1, "ffn_act")][6:] * wide).sum(1)])
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-5 * float(expect.abs().max()))


def test_the_expression_syntax_parses_to_its_weights_and_names_what_is_wrong(tiny, tmp_path):
    a, b = Site(1, "ffn_out", 5), Site(0, "ffn_act", 7)
    r = parse("2 * (layer.1.ffn_out.5 + layer.0.ffn_act.7) - layer.1.ffn_out.5 / 4", tiny.model)
    assert r.weights == {a: 1.75, b: 2.0}
    assert (neuron(a) - 0.5 * neuron(b)).weights == parse("layer.1.ffn_out.5-0.5*layer.0.ffn_act.7", tiny.model).weights
    assert (mean([a, b]) * 2).weights == {a: 1.0, b: 1.0}
    for spec, message in [
        ("layer.1.ffn_out.5 * layer.0.ffn_act.7", "product of two sites is not linear"),
        ("layer.1.ffn_out.5 - layer.1.ffn_out.5", "cancels"),
        ("layer.1.ffn_out.5 +", "ends early"),
        ("layer.1.ffn_out.5 + 3", "constant term"),
        ("layer.1.ffn_out.5 / layer.0.ffn_act.7", "division by a site"),
        ("(layer.1.ffn_out.5", "not closed"),
        ("layer.9.ffn_out.5", "layer 9 out of range"),
        ("layer.1.ffn_out.99999", "unit 99999 out of range"),
        ("layer.1.attn.5", "unknown point 'attn'"),
        ("layer.1.ffn_out.5 ^ 2", "cannot read"),
        ("2 * 3", "reads no site"),
        ("layer.1.resid@0", "no directions file"),
    ]:
        with pytest.raises(TargetError, match=message):
            parse(spec, tiny.model)
    H = tiny.model.config.hidden_size
    v = torch.randn(2, H)
    save_file({"directions": v}, str(tmp_path / "d.safetensors"), metadata={"names": '["pos", "neg"]'})
    d = load_directions(tmp_path / "d.safetensors")
    (t,) = terms_targets(tiny.model, ["layer.1.resid@pos - layer.1.resid@1 + layer.1.resid.0"], d)
    expect = direction(1, "resid", v[0] - v[1]) + neuron(Site(1, "resid", 0))
    assert t.readout.weights == pytest.approx(expect.weights) and t.reads == ["layer.1.resid", "layer.1.resid.0"]
    for spec, message in [("layer.1.resid@nope", "not in"), ("layer.1.resid@5", "has 2 rows"),
                          ("layer.1.ffn_act@0", "32 wide, ffn_act is 64 wide")]:
        with pytest.raises(TargetError, match=message):
            terms_targets(tiny.model, [spec], d)


@pytest.mark.parametrize("make,message", [
    (lambda p: save_file({"weights": torch.ones(2, 4)}, p), "no 'directions' tensor"),
    (lambda p: save_file({"directions": torch.ones(4)}, p), r"is \(4,\)"),
    (lambda p: save_file({"directions": torch.tensor([[1.0, float("nan")]])}, p), "row 0 .* is not finite"),
    (lambda p: save_file({"directions": torch.tensor([[1.0, 2.0], [0.0, 0.0]])}, p), "row 1 .* all zeros"),
    (lambda p: save_file({"directions": torch.ones(2, 4)}, p, metadata={"names": '["a"]'}), "metadata 'names'"),
    (lambda p: open(p, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"), "not a readable safetensors"),
    (lambda p: None, "does not exist"),
])
def test_a_bad_directions_file_is_one_clear_error(tmp_path, make, message):
    path = str(tmp_path / "d.safetensors")
    make(path)
    with pytest.raises(TargetError, match=message):
        load_directions(path)


def test_regularizers_are_objectives_that_subtract(tiny):
    """The module maximizes objective - reg.norm * |e|^2; the reported objective has no penalty."""
    (t,) = terms_targets(tiny.model, [SPEC])
    m = module_for(tiny, [t.readout], True, reg_norm=0.25)
    with torch.no_grad():
        obj, total = m.chunk_terms(slice(None), m.objective_batch)
        e = m.embeds()
    torch.testing.assert_close(total, obj - 0.25 * e.pow(2).sum((1, 2)))
    both = t.readout - 0.25 * InputNorm()
    with torch.no_grad():
        torch.testing.assert_close(both(m.reading(slice(None))), total)
    assert isinstance(2 * neuron(Site(0, "resid", 1)) + neuron(Site(1, "resid", 1)), Readout)


def test_row_state_takes_interleaves_and_saves_every_declared_field():
    """Split among 3 ranks and interleaved back, every per-row field (whatever fields RowState
    declares) is the original; a state_dict round trip too."""
    n, param = 7, torch.randn(7, 2, 3)
    s = RowState.create(n, window=4, param=param, keep_best=True, memory=3)
    s.step, s.curve_steps = 5, [0, 4]
    assert all(getattr(s, name) is not None for name, _ in RowState.row_fields())  # every field in use
    for name, _ in RowState.row_fields():  # distinct values in every field
        v = getattr(s, name)
        if name == "curves":
            v = torch.randn(2, n)
        setattr(s, name, torch.arange(v.numel()).reshape(v.shape).to(v.dtype) if v.dtype != torch.bool
                else torch.rand(v.shape) > 0.5)
    parts = [s.take(slice(r, n, 3)) for r in range(3)]
    assert [p.rows for p in parts] == [3, 2, 2]
    back = RowState.interleave(parts)
    again = RowState.from_state_dict(s.state_dict())
    for name, _ in RowState.row_fields():
        assert torch.equal(getattr(back, name), getattr(s, name)), name
        assert torch.equal(getattr(again, name), getattr(s, name)), name
    assert back.step == 5 and back.curve_steps == [0, 4]


def direction_file(path, vectors: torch.Tensor, names: list[str] | None = None) -> str:
    save_file({"directions": vectors.contiguous()}, str(path), metadata={"names": json.dumps(names)} if names else None)
    return str(path)


def test_a_planted_direction_is_textualized_to_its_word(tiny, tiny_dir, tmp_path):
    """A direction aligned with a word's own representation at the site (resid is a LayerNorm
    output: every input's h has the same norm, so h . r_w is largest at h = r_w) is maximized by
    that word over the vocabulary, and the optimized input's closest word is that word. The run
    directory keeps the directions, and its table rebuilds the same objectives."""
    from ft.core.integrity import read_manifest
    from ft.model.vocab import load_or_sweep
    from ft.rundir.results import read_directions, read_targets
    from ft.targets import readouts_of_table
    from ft.train import run
    from tests.test_train import compose_cfg

    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    sweep = load_or_sweep(tiny, vocab, "resid", use_cache=False)  # [V', layers, H]
    words = ["piano", "river", "horse"]
    rows = [vocab.tokens.index(w) for w in words]
    path = direction_file(tmp_path / "planted.safetensors", sweep[rows, 1], words)
    cfg = compose_cfg([f"model.name_or_path={tiny_dir}", "target=directions", f"target.file={path}",
                       "target.site=[layer.1.resid,layer.0.resid]", "trainer.max_steps=150", "trainer.accelerator=cpu",
                       "+trainer.enable_progress_bar=false", "logger.wandb.mode=disabled"])
    run(cfg, tmp_path / "run")
    df = read_targets(tmp_path / "run")
    top = df[df.layer == 1]
    assert list(top.direction_name) == words and list(top.kind.unique()) == ["direction"]
    assert list(top.most_activating_word) == words
    assert [c[0] for c in top.closest_words] == words
    assert (top.objective - top.most_activating_word_activation).abs().max() < 1e-3  # reached the word's own h
    assert list(df.spec) == [f"layer.{L}.resid@{i}" for L in (1, 0) for i in range(3)]
    assert list(df.sites) == [[f"layer.{L}.resid"] for L in (1, 0) for _ in range(3)]
    assert "directions.safetensors" in read_manifest(tmp_path / "run")
    rebuilt = readouts_of_table(tiny.model, df, read_directions(tmp_path / "run"))
    for r, L, i in zip(rebuilt, [1, 1, 1, 0, 0, 0], [0, 1, 2] * 2, strict=True):
        assert r.weights == direction(L, "resid", sweep[rows[i], 1]).weights


def test_a_terms_run_reports_the_expression_for_its_saved_input(tiny, tiny_dir, tmp_path):
    """`objective` of a terms run = the expression over the HF model's own activations for the
    saved `embeds`, direction terms included; the most activating word is the brute-force argmax."""
    from ft.rundir.results import read_inputs, read_targets
    from ft.train import run
    from tests.test_train import compose_cfg

    torch.manual_seed(1)
    v = torch.randn(2, tiny.model.config.hidden_size)
    path = direction_file(tmp_path / "d.safetensors", v, ["a", "b"])
    specs = [SPEC, "layer.1.resid@a - 0.5 * layer.1.resid@b + 3 * layer.0.ffn_out.1"]
    cfg = compose_cfg([f"model.name_or_path={tiny_dir}", "target=terms", f"target.specs={json.dumps(specs)}",
                       f"target.file={path}", "trainer.max_steps=20", "trainer.accelerator=cpu",
                       "+trainer.enable_progress_bar=false", "logger.wandb.mode=disabled"])
    run(cfg, tmp_path / "run")
    df, inputs = read_targets(tmp_path / "run"), read_inputs(tmp_path / "run")
    assert list(df.kind) == ["terms", "terms"] and list(df.spec) == specs
    assert list(df.sites[1]) == ["layer.1.resid", "layer.0.ffn_out.1"]
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    W = tiny.word_embeddings.detach()

    def expression(acts):
        return torch.stack([
            acts[(1, "ffn_out")][:, 5] - 0.5 * acts[(0, "ffn_act")][:, 7] + 2 * acts[(1, "resid")][:, 3],
            acts[(1, "resid")] @ v[0] - 0.5 * acts[(1, "resid")] @ v[1] + 3 * acts[(0, "ffn_out")][:, 1]], 1)

    from ft.engine.module import full_sequence

    with torch.no_grad():
        seq = full_sequence(inputs["embeds"], W, vocab.cls_id, vocab.sep_id)
        got = expression(hf_points(tiny.model, seq))
        words = full_sequence(W[vocab.ids][:, None], W, vocab.cls_id, vocab.sep_id)
        per_word = expression(hf_points(tiny.model, words))  # [V', targets]
    for t in range(2):
        assert df.objective[t] == pytest.approx(float(got[t, t]), rel=1e-5, abs=1e-5)
        best = int(per_word[:, t].argmax())
        assert df.most_activating_word[t] == vocab.tokens[best]
        assert df.most_activating_word_activation[t] == pytest.approx(float(per_word[best, t]), rel=1e-4, abs=1e-5)


def test_dataset_examples_score_any_objective(tiny, tmp_path):
    """ft.examples' scorer reads terms and directions: its value for `[CLS] word [SEP]` at the word
    is the objective of that input."""
    from ft.measure.examples import TargetScorer

    v = torch.randn(1, tiny.model.config.hidden_size)
    d = load_directions(direction_file(tmp_path / "d.safetensors", v))
    targets = terms_targets(tiny.model, [SPEC, "layer.1.resid@0 - layer.0.ffn_out.2"], d)
    scorer = TargetScorer(tiny, [t.readout for t in targets])
    ids = tiny.tokenizer.convert_tokens_to_ids(["piano", "river"])
    got = scorer.batch([[i] for i in ids])[:, 0]  # [2 words, 2 targets]
    W = tiny.word_embeddings.detach()
    from ft.engine.module import full_sequence

    with torch.no_grad():
        acts = hf_points(tiny.model, full_sequence(W[ids][:, None], W, tiny.tokenizer.cls_token_id,
                                                   tiny.tokenizer.sep_token_id))
    expect = torch.stack([acts[(1, "ffn_out")][:, 5] - 0.5 * acts[(0, "ffn_act")][:, 7] + 2 * acts[(1, "resid")][:, 3],
                          acts[(1, "resid")] @ v[0] - acts[(0, "ffn_out")][:, 2]], 1)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
