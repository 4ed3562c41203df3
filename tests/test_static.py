"""Static readings (ft.static): the vocabulary tokens a unit's weights point to, no forward pass."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformers import AlbertConfig, AlbertModel, BertModel

from ft.model.encoder import from_model
from ft.model.sites import Site
from ft.model.static import agreement, readings
from ft.model.vocab import Vocabulary
from ft.static import main


def by_hand(E: torch.Tensor, vec: torch.Tensor, tokens: list[str], largest: bool = True) -> list[str]:
    return [tokens[int(i)] for i in (E @ vec).topk(10, largest=largest).indices]


def test_readings_equal_the_matrix_products_of_the_hf_weights(tiny, tiny_dir):
    model = BertModel.from_pretrained(str(tiny_dir)).eval()
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    E = model.embeddings.word_embeddings.weight.detach()[vocab.ids]  # special tokens left out
    sites = [Site(1, "ffn_act", 5), Site(0, "ffn_act", 63), Site(1, "ffn_out", 7), Site(0, "resid", 2),
             Site(0, "attn_ctx", 1), None]
    r = readings(tiny.model, vocab, sites)
    for i, layer, j in ((0, 1, 5), (1, 0, 63)):
        v = model.encoder.layer[layer].output.dense.weight.detach()[:, j]  # what it writes
        k = model.encoder.layer[layer].intermediate.dense.weight.detach()[j]  # what it reads
        assert r["static_promotes"][i] == by_hand(E, v, vocab.tokens)
        assert r["static_suppresses"][i] == by_hand(E, v, vocab.tokens, largest=False)
        assert r["static_detects"][i] == by_hand(E, k, vocab.tokens)
    for i, d in ((2, 7), (3, 2)):  # a hidden dimension: that column of E
        assert r["static_promotes"][i] == [vocab.tokens[int(t)] for t in E[:, d].topk(10).indices]
        assert r["static_detects"][i] is None
    assert all(r[c][4] is None and r[c][5] is None for c in r)  # attention context, not a unit
    assert not set(sum(r["static_promotes"][:4], [])) & set(tiny.tokenizer.all_special_tokens)


def test_factorized_embeddings_are_read_through_their_projection(tiny):
    torch.manual_seed(0)
    cfg = AlbertConfig(vocab_size=tiny.tokenizer.vocab_size, embedding_size=16, hidden_size=32,
                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
    model = AlbertModel(cfg).eval()
    enc = from_model(model, tiny.tokenizer, "tiny albert")
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    with torch.no_grad():
        E = model.encoder.embedding_hidden_mapping_in(model.embeddings.word_embeddings.weight[vocab.ids])
    layer = model.encoder.albert_layer_groups[0].albert_layers[0]
    r = readings(enc.model, vocab, [Site(1, "ffn_act", 3)])
    assert r["static_promotes"][0] == by_hand(E, layer.ffn_output.weight.detach()[:, 3], vocab.tokens)
    assert r["static_detects"][0] == by_hand(E, layer.ffn.weight.detach()[3], vocab.tokens)


def test_every_unit_in_one_command_and_the_run_columns(tiny, tiny_dir, tmp_path, capsys):
    assert main(["--model", str(tiny_dir), "--out", str(tmp_path / "static.parquet")]) == 0
    df = pd.read_parquet(tmp_path / "static.parquet")
    assert len(df) == 2 * (64 + 32) and df.site.is_unique  # every ffn_act and ffn_out unit of both layers
    one = df[df.site == "layer.1.ffn_act.5"].iloc[0]
    assert list(one.static_promotes) == readings(tiny.model, Vocabulary.from_tokenizer(tiny.tokenizer),
                                                 [Site(1, "ffn_act", 5)])["static_promotes"][0]
    assert "192 units" in capsys.readouterr().out
    assert main(["--model", str(tiny_dir), "--out", str(tmp_path / "x.parquet"), "--points", "attn_ctx"]) == 2
    assert not (tmp_path / "x.parquet").exists()
    from ft.rundir.results import read_summary, read_targets
    from ft.train import run
    from tests.test_train import compose_cfg, tiny_overrides

    run(compose_cfg(tiny_overrides(tiny_dir, "default") + ["logger.wandb.mode=disabled"]), tmp_path / "run")
    targets = read_targets(tmp_path / "run")
    assert targets.static_promotes.map(len).eq(10).all() and targets.static_detects.isna().all()  # ffn_out units
    assert read_summary(tmp_path / "run")["final/static_maw_agreement"] == pytest.approx(agreement(targets))
    planted = pd.DataFrame({"most_activating_word": ["cat", "dog"], "static_promotes": [["cat"], ["x"]],
                            "static_suppresses": [["y"], ["z"]], "static_detects": [None, ["w"]]})
    assert agreement(planted) == 0.5


# the FFN of layer 0 in Hugging Face's own module names: (activation module, output projection)
HF_FFN = {
    "bert": lambda m: (m.encoder.layer[0].intermediate.intermediate_act_fn, m.encoder.layer[0].output.dense),
    "distilbert": lambda m: (m.transformer.layer[0].ffn.activation, m.transformer.layer[0].ffn.lin2),
    "deberta-v2": lambda m: (m.encoder.layer[0].intermediate.intermediate_act_fn, m.encoder.layer[0].output.dense),
    "modernbert": lambda m: (m.layers[0].mlp.act, m.layers[0].mlp.Wo),
    "albert": lambda m: (m.encoder.albert_layer_groups[0].albert_layers[0].activation,
                         m.encoder.albert_layer_groups[0].albert_layers[0].ffn_output),
}
for _f in ("roberta", "xlm-roberta", "camembert", "electra"):
    HF_FFN[_f] = HF_FFN["bert"]


@pytest.mark.parametrize("family", sorted(HF_FFN))
def test_ffn_static_vectors_are_what_the_forward_reads_and_writes(family):
    """Per family, against the forward itself: a unit's read vector k and bias reproduce what its
    activation function receives (for a gated FFN, the input half, not the gate), and the write
    vectors reproduce the FFN's output from the activations. Hooks on Hugging Face's own modules,
    not ft's adapters, give the reference."""
    from transformers import AutoModel

    from ft.model.static import unit_vectors
    from tests.families import FAMILIES, family_config

    assert family in FAMILIES
    torch.manual_seed(0)
    model = AutoModel.from_config(family_config(family, 60, 1), attn_implementation="eager").eval()
    act, out = HF_FFN[family](model)
    seen: dict[str, object] = {}

    def keep(name: str):  # a forward hook that records the first call's input (and output) and changes nothing
        def hook(_module, inputs, output) -> None:
            seen.setdefault(name, (inputs[0], output))
        return hook

    hooks = [act.register_forward_hook(keep("act")), out.register_forward_hook(keep("out"))]

    in_proj = {"distilbert": lambda m: m.transformer.layer[0].ffn.lin1, "modernbert": lambda m: m.layers[0].mlp.Wi,
               "albert": lambda m: m.encoder.albert_layer_groups[0].albert_layers[0].ffn}.get(
        family, lambda m: m.encoder.layer[0].intermediate.dense)(model)
    hooks.append(in_proj.register_forward_hook(keep("in")))
    with torch.no_grad():
        model(input_ids=torch.randint(5, 60, (3, 6)))
    for h in hooks:
        h.remove()
    h, a_in = (seen[k][0].reshape(-1, seen[k][0].shape[-1]) for k in ("in", "act"))  # [tokens, hidden], [tokens, inter]
    inter = a_in.shape[-1]
    write, read = unit_vectors(model, 0, "ffn_act", torch.arange(inter))
    bias = a_in - h @ read.T  # [tokens, inter]: a unit's bias is the same for every token
    assert torch.allclose(bias, bias[:1].expand_as(bias), atol=1e-4), "read vectors are not what the units read"
    x, y = (t.reshape(-1, t.shape[-1]) for t in seen["out"])  # the output projection's input and output
    rest = y - x @ write  # the output projection's bias, the same for every token
    assert torch.allclose(rest, rest[:1].expand_as(rest), atol=1e-4), "write vectors are not what the units write"
