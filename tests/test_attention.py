"""Attention-weight objectives (`layer.L.attn.H.I.J`): equal to Hugging Face's own
`output_attentions[L][row, H, I, J]` from a separately loaded eager copy of each family's tiny
model, and for BERT to softmax(q k^T / sqrt(d)) computed by hand from the layer's input; errors
name the bad value; the gradient reaches the optimized input."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from ft.core.errors import TargetError
from ft.model.arch import adapter
from ft.targets.kinds import attention as attention_module
from ft.targets.kinds.attention import AttentionWeight, AttentionWeights, parse_attention
from ft.targets.objectives import Reading
from tests.families import FAMILIES, build_family

ATOL = 1e-5


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("attention_families")
    return {f: build_family(root / f, f, seed=10 + i) for i, f in enumerate(FAMILIES)}


def load(path: Path, eager: bool = False) -> torch.nn.Module:
    """The model as `from_pretrained` gives it (SDPA by default where the family has it), frozen."""
    kw = {"attn_implementation": "eager"} if eager else {}
    model = AutoModel.from_pretrained(path, **kw).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def framed_ids(model: torch.nn.Module, rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """[rows, length + 2]: CLS, random word ids, SEP (ids 0..4 are the special tokens of both tokenizers)."""
    g = torch.Generator().manual_seed(seed)
    vocab = int(adapter(model).word_embeddings.shape[0])
    ids = torch.randint(5, vocab, (rows, length + 2), generator=g)
    cls = model.config.cls_token_id if getattr(model.config, "cls_token_id", None) is not None else 2
    sep = model.config.sep_token_id if getattr(model.config, "sep_token_id", None) is not None else 3
    ids[:, 0], ids[:, -1] = cls, sep
    return ids


def varied_rows(model: torch.nn.Module, S: int) -> list[AttentionWeight]:
    """Five rows that differ in layer, head and both positions (each layer, each head, CLS and SEP)."""
    L, H = adapter(model).num_layers, adapter(model).num_heads
    picks = [(L - 1, H - 1, 1, S - 2), (0, 0, 0, S - 1), (L - 1, 0, S - 1, 0), (L // 2, H - 1, 3, 3), (0, H - 1, 2, 4)]
    return [AttentionWeight(model, *p) for p in picks]


def reading(model, seq=None, input_ids=None) -> Reading:
    return Reading(model=model, embeds=None if seq is None else seq[:, 1:-1], seq=seq, position=0, fast=False,
                   input_ids=input_ids)


def expected(reference: torch.nn.Module, rows: list[AttentionWeight], **given) -> torch.Tensor:
    with torch.no_grad():
        att = reference(**given, output_attentions=True).attentions
    assert len(att) == adapter(reference).num_layers
    return torch.stack([att[r.layer][i, r.head, r.query, r.key] for i, r in enumerate(rows)])


@pytest.mark.parametrize("family", FAMILIES)
def test_each_row_is_hugging_faces_own_attention_weight(family_dirs, family):
    model = load(family_dirs[family])
    reference = load(family_dirs[family], eager=True)  # a separate copy, eager from the start
    before = model.config._attn_implementation
    ids = framed_ids(model, 5, 6, seed=1)
    rows = varied_rows(model, ids.shape[1])
    seq = model.get_input_embeddings()(ids)
    got = AttentionWeights(rows).value(reading(model, seq=seq))
    want = expected(reference, rows, inputs_embeds=seq)
    assert got.shape == (5,)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert len(set(want.tolist())) == 5  # the rows read different entries
    # the same through the model's own lookup (input_ids)
    got_ids = AttentionWeights(rows).value(reading(model, input_ids=ids))
    torch.testing.assert_close(got_ids, expected(reference, rows, input_ids=ids), atol=ATOL, rtol=0)
    assert model.config._attn_implementation == before  # the attention setting is restored


def test_bert_weights_equal_softmax_of_scaled_query_key_products(tiny):
    """Independent of Hugging Face's attention code: q = W_q h + b, k = W_k h + b from the layer's
    input (hidden_states[L]), softmax(q k^T / sqrt(d)) per head."""
    model = tiny.model
    ids = framed_ids(model, 4, 7, seed=2)
    S = ids.shape[1]
    rows = [AttentionWeight(model, 1, 1, 1, S - 2), AttentionWeight(model, 0, 0, 0, S - 1),
            AttentionWeight(model, 1, 0, S - 1, 0), AttentionWeight(model, 0, 1, 4, 4)]
    seq = model.get_input_embeddings()(ids)
    got = AttentionWeights(rows).value(reading(model, seq=seq))
    H = model.config.num_attention_heads
    d = model.config.hidden_size // H
    with torch.no_grad():
        hidden = model(inputs_embeds=seq, output_hidden_states=True).hidden_states
    want = []
    for i, r in enumerate(rows):
        s = model.encoder.layer[r.layer].attention.self
        h = hidden[r.layer][i]  # [S, hidden]
        q = (h @ s.query.weight.T + s.query.bias).view(S, H, d)[:, r.head]
        k = (h @ s.key.weight.T + s.key.bias).view(S, H, d)[:, r.head]
        p = torch.softmax(q @ k.T / d**0.5, dim=-1)
        want.append(p[r.query, r.key])
    torch.testing.assert_close(got, torch.stack(want), atol=ATOL, rtol=0)


def test_one_objective_reads_every_row_and_the_gradient_reaches_the_input(family_dirs):
    for family in ("bert", "distilbert", "albert"):
        model = load(family_dirs[family])
        ids = framed_ids(model, 3, 5, seed=3)
        seq = model.get_input_embeddings()(ids).clone().requires_grad_(True)
        L = adapter(model).num_layers
        objective = AttentionWeight(model, L - 1, 1, 2, 4)
        value = objective(reading(model, seq=seq))
        assert value.shape == (3,) and value.requires_grad
        value.sum().backward()
        assert seq.grad is not None and torch.isfinite(seq.grad).all()
        assert seq.grad[:, 1:-1].abs().sum() > 0, family  # the optimized part gets a gradient
        # and it is the right gradient: a finite difference on one input coordinate
        eps = 1e-3
        bumped = seq.detach().clone()
        bumped[0, 2, 0] += eps
        with torch.no_grad():
            step = (objective(reading(model, seq=bumped)) - objective(reading(model, seq=seq.detach())))[0] / eps
        assert abs(step.item() - seq.grad[0, 2, 0].item()) < 1e-2 * max(1.0, abs(step.item())), family


def test_objective_algebra_and_contract_attributes(tiny):
    model = tiny.model
    a, b = AttentionWeight(model, 0, 1, 2, 3), AttentionWeight(model, 1, 0, 0, 0)
    assert a.reads == ("layer.0.attn.1.2.3",) and a.spec == "layer.0.attn.1.2.3"
    assert a.sites == [] and a.layers == [0] and b.layers == [1]
    ids = framed_ids(model, 2, 4, seed=4)
    r = reading(model, input_ids=ids)
    torch.testing.assert_close((a - 0.5 * b)(r), a(r) - 0.5 * b(r))


@pytest.mark.parametrize("args, value, valid", [
    ((2, 0, 0, 0), "layer 2", "0..1"),
    ((-1, 0, 0, 0), "layer -1", "0..1"),
    ((0, 2, 0, 0), "head 2", "0..1"),
    ((0, 0, -1, 0), "query position -1", "valid"),
    ((0, 0, 0, -3), "key position -3", "valid"),
    ((0, 0, 16, 0), "query position 16", "0..15"),
])
def test_bad_numbers_are_refused_naming_the_value_and_the_valid_range(tiny, args, value, valid):
    with pytest.raises(TargetError) as e:
        AttentionWeight(tiny.model, *args)
    assert value in str(e.value) and valid in str(e.value)


def test_a_position_beyond_the_sequence_is_refused_naming_it(tiny):
    model = tiny.model
    ids = framed_ids(model, 2, 3, seed=5)  # S = 5
    for bad in (AttentionWeight(model, 0, 0, 5, 0), AttentionWeight(model, 0, 0, 1, 9)):
        with pytest.raises(TargetError) as e:
            AttentionWeights([AttentionWeight(model, 0, 0, 0, 0), bad]).value(reading(model, input_ids=ids))
        assert f"position {max(bad.query, bad.key)}" in str(e.value) and "0..4" in str(e.value)


def test_parse_attention_round_trips_and_ignores_other_forms(tiny):
    model = tiny.model
    a = parse_attention("layer.1.attn.0.3.2", model)
    assert isinstance(a, AttentionWeight)
    assert (a.layer, a.head, a.query, a.key) == (1, 0, 3, 2)
    assert parse_attention(a.spec, model).spec == a.spec == "layer.1.attn.0.3.2"
    for other in ("layer.1.head.0", "layer.1.ffn_out.3", "layer.1.attn.0.3", "layer.1.attn.0.3.2.1", "attn", "",
                  "layer.x.attn.0.1.2"):
        assert parse_attention(other, model) is None, other
    with pytest.raises(TargetError, match="head 7"):
        parse_attention("layer.0.attn.7.0.0", model)
    with pytest.raises(TargetError, match="layer 9"):
        parse_attention("layer.9.attn.0.0.0", model)


def test_a_model_that_returns_no_probabilities_is_refused_not_read_wrong(family_dirs, monkeypatch):
    """Without the switch to eager attention an SDPA model gives no probabilities: a TargetError,
    never a number."""
    model = load(family_dirs["bert"])
    assert model.config._attn_implementation != "eager"
    monkeypatch.setattr(attention_module, "eager_attention", lambda _m: contextlib.nullcontext())
    ids = framed_ids(model, 2, 3)
    with pytest.raises(TargetError, match="no attention probabilities"):
        AttentionWeight(model, 0, 0, 0, 0)(reading(model, input_ids=ids))


def test_layers_above_the_highest_read_do_not_run(tiny):
    model = tiny.model
    calls = []
    handle = model.encoder.layer[1].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        ids = framed_ids(model, 2, 3)
        AttentionWeight(model, 0, 1, 1, 2)(reading(model, input_ids=ids))
        assert calls == []
        AttentionWeight(model, 1, 1, 1, 2)(reading(model, input_ids=ids))
        assert calls == [1]
    finally:
        handle.remove()


# -- target=attention: the kind, end to end -----------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_a_run_reports_hugging_faces_attention_weight_of_its_found_tokens(family_dirs, family, tmp_path):
    """`target=attention input=tokens`: each reported objective equals a fresh Hugging Face forward
    of `[CLS] found tokens [SEP]` with `output_attentions`, at the target's (layer, head, query, key)."""
    from ft.cli.run import run
    from ft.rundir.results import read_targets
    from tests.test_train import compose_cfg

    sites = ["layer.1.attn.0.1.0", "layer.0.attn.1.2.1"]
    cfg = compose_cfg([f"model.name_or_path={family_dirs[family]}", "target=attention",
                       f"target.sites=[{','.join(sites)}]", "input=tokens", "input.length=2", "trainer.max_steps=4",
                       "logger.wandb.mode=disabled", "+trainer.enable_progress_bar=false", "search.candidates=16"])
    run(cfg, tmp_path / "run")
    df = read_targets(tmp_path / "run")
    assert list(df.kind) == ["attention", "attention"] and list(df.label) == sites
    reference = load(family_dirs[family], eager=True)
    tok = AutoTokenizer.from_pretrained(family_dirs[family])
    for row in df.itertuples():
        ids = torch.tensor([[tok.cls_token_id, *row.token_ids, tok.sep_token_id]])
        att = reference(input_ids=ids, output_attentions=True).attentions
        _, layer, _, head, query, key = row.spec.split(".")
        layer, head, query, key = int(layer), int(head), int(query), int(key)
        assert row.objective == pytest.approx(float(att[layer][0, head, query, key]), abs=1e-5)


def test_the_kind_is_listed_refuses_bad_sites_and_rebuilds_from_the_table(tiny):
    import pandas as pd

    from ft.core.errors import ConfigError
    from ft.targets import readouts_of_table, unit_kind, unit_kinds

    assert "attention" in unit_kinds()
    kind = unit_kind("attention")
    with pytest.raises(ConfigError, match="layer.1.ffn_out.3"):
        kind.check({"kind": "attention", "sites": ["layer.1.ffn_out.3"]})
    (rebuilt,) = readouts_of_table(tiny.model, pd.DataFrame({"kind": ["attention"], "spec": ["layer.1.attn.0.1.2"],
                                                             "sites": [[]]}))
    assert isinstance(rebuilt, AttentionWeight) and (rebuilt.layer, rebuilt.head, rebuilt.query, rebuilt.key) == (
        1, 0, 1, 2)
