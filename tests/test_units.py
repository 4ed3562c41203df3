"""Units beyond neurons: attention heads, SAE latents, class logits, each against a hand computation
from the HF model's own hidden states and weights."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from ft.engine.module import TextualizationModule, full_sequence
from ft.inputs import build_input
from ft.model.encoder import load_encoder
from ft.model.vocab import Vocabulary
from ft.targets import neuron_targets, terms_targets
from tests.families import build_family


@pytest.fixture(scope="module")
def distil_dir(tmp_path_factory) -> Path:
    return build_family(tmp_path_factory.mktemp("distil"), "distilbert", seed=5)


def attention_by_hand(model, family: str, seq: torch.Tensor, layer: int, position: int) -> torch.Tensor:
    """[rows, heads, d_head]: softmax(q k^T / sqrt(d)) v at `position` of layer `layer`, from the
    layer's input hidden state and its own query/key/value projections."""
    with torch.no_grad():
        hidden = model(inputs_embeds=seq, output_hidden_states=True).hidden_states[layer]
        if family == "distilbert":
            att = model.transformer.layer[layer].attention
            q, k, v, heads = att.q_lin, att.k_lin, att.v_lin, att.n_heads
        else:
            att = model.encoder.layer[layer].attention.self
            q, k, v, heads = att.query, att.key, att.value, att.num_attention_heads
        n, S, H = hidden.shape
        d = H // heads
        split = lambda t: t.view(n, S, heads, d).transpose(1, 2)  # noqa: E731 - [n, heads, S, d]
        Q, K, V = split(q(hidden)), split(k(hidden)), split(v(hidden))
        w = (Q[:, :, position : position + 1] @ K.transpose(-1, -2) / d**0.5).softmax(-1)
        return (w @ V)[:, :, 0]


def module_of(enc, readouts, fast=None, length=2):
    vocab = Vocabulary.from_tokenizer(enc.tokenizer)
    inputs = build_input("embedding", range(len(readouts)), enc.word_embeddings, seed=2, length=length)
    return TextualizationModule(enc.model, readouts, inputs, partial(torch.optim.Adam, lr=0.1), vocab.cls_id,
                                vocab.sep_id, fast_forward=fast)


@pytest.mark.parametrize("family,fast", [("bert", True), ("bert", False), ("distilbert", None)],
                         ids=["bert-lean", "bert-hooked", "distilbert-hooked"])
def test_a_head_is_the_norm_of_its_context_vector(family, fast, tiny, distil_dir):
    enc = tiny if family == "bert" else load_encoder(str(distil_dir))
    targets = neuron_targets(enc.model, sites=["layer.1.head.0", "layer.0.head.1"])
    targets += terms_targets(enc.model, ["layer.1.head.1 - 0.5 * layer.0.ffn_out.3", "layer.1.head.0 - layer.1.head.1"])
    assert [t.kind for t in targets] == ["head", "head", "terms", "terms"] and targets[0].reads == ["layer.1.head.0"]
    m = module_of(enc, [t.readout for t in targets], fast)
    with torch.no_grad():
        got = m()
        seq = m.reading(slice(None)).seq
        ctx1, ctx0 = attention_by_hand(enc.model, family, seq, 1, 1), attention_by_hand(enc.model, family, seq, 0, 1)
        out = enc.model(inputs_embeds=seq, output_hidden_states=True)
        lin2 = (enc.model.transformer.layer[0].ffn.lin2 if family == "distilbert"
                else enc.model.encoder.layer[0].output.dense)
        ffn0 = []
        h = lin2.register_forward_hook(lambda _m, _i, o: ffn0.append(o[:, 1]))
        enc.model(inputs_embeds=seq)
        h.remove()
    del out
    expect = torch.stack([ctx1[0, 0].norm(), ctx0[1, 1].norm(), ctx1[2, 1].norm() - 0.5 * ffn0[0][2, 3],
                          ctx1[3, 0].norm() - ctx1[3, 1].norm()])  # a selectivity expression: heads only
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-5 * float(expect.abs().max()))


def test_head_sites_are_checked_and_named(tiny):
    from ft.core.errors import TargetError

    with pytest.raises(TargetError, match="head 2 out of range; valid 0..1"):
        neuron_targets(tiny.model, sites=["layer.0.head.2"])
    with pytest.raises(TargetError, match="layer 5 out of range"):
        neuron_targets(tiny.model, sites=["layer.5.head.0"])
    with pytest.raises(TargetError, match="head 9 out of range"):
        terms_targets(tiny.model, ["layer.0.head.9 + layer.0.ffn_out.1"])


def random_sae(d_in: int, d_sae: int, seed: int = 0, arch: str = "standard", k: int | None = None):
    from ft.targets.sae_file import SAE

    g = torch.Generator().manual_seed(seed)
    return SAE(torch.randn(d_in, d_sae, generator=g) / d_in**0.5, torch.randn(d_sae, generator=g) * 0.1,
               torch.randn(d_sae, d_in, generator=g), torch.randn(d_in, generator=g) * 0.1, arch, True,
               torch.rand(d_sae, generator=g) * 0.2 if arch == "jumprelu" else None, k)


@pytest.mark.parametrize("fast", [True, False], ids=["lean", "hooked"])
def test_an_sae_latent_is_its_pre_activation_from_the_files_tensors(tiny, tmp_path, fast):
    from ft.targets import sae_targets
    from ft.targets.sae_file import load_sae
    from tests.test_objectives import hf_points

    H = tiny.model.config.hidden_size
    random_sae(H, 3 * H, seed=1).save(tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    targets = sae_targets(tiny.model, sae, "layer.1.resid", latents=[0, 5, 77])
    targets += sae_targets(tiny.model, sae, "layer.0.ffn_out", num_latents=2, seed=3)
    assert [t.kind for t in targets] == ["sae"] * 5 and [t.latent for t in targets][:3] == [0, 5, 77]
    m = module_of(tiny, [t.readout for t in targets], fast)
    with torch.no_grad():
        got = m()
        acts = hf_points(tiny.model, m.reading(slice(None)).seq)
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))  # by hand, from the file's tensors
    h = torch.cat([acts[(1, "resid")][:3], acts[(0, "ffn_out")][3:]])
    cols = torch.tensor([t.latent for t in targets])
    expect = ((h - w["b_dec"]) * w["W_enc"][:, cols].T).sum(1) + w["b_enc"][cols]
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-5 * float(expect.abs().max()))


@pytest.mark.parametrize("arch,extra", [("standard", {}), ("jumprelu", {}), ("topk", {"k": 4}),
                                        ("topk", {"activation_fn_kwargs": {"k": 4}, "architecture": None,
                                                  "activation_fn_str": "topk"})])
def test_sae_post_activations_follow_the_architecture(tmp_path, arch, extra):
    from ft.targets.sae_file import load_sae

    sae = random_sae(8, 16, arch=arch, k=4)
    sae.save(tmp_path / "s")
    cfg_path = tmp_path / "s" / "cfg.json"
    cfg = {**json.loads(cfg_path.read_text()), **extra}
    cfg = {k: v for k, v in cfg.items() if v is not None and not ("activation_fn_kwargs" in extra and k == "k")}
    cfg_path.write_text(json.dumps(cfg))
    back = load_sae(tmp_path / "s")
    h = torch.randn(5, 8)
    z = (h - sae.b_dec) @ sae.W_enc + sae.b_enc
    if arch == "standard":
        want = z.clamp_min(0)
    elif arch == "jumprelu":
        want = torch.where(z > sae.threshold, z, 0)
    else:
        keep = z >= z.topk(4, dim=1).values[:, -1:]
        want = torch.where(keep, z.clamp_min(0), 0)
    torch.testing.assert_close(back.encode(h), want)


@pytest.mark.parametrize("change,message", [
    (lambda d: (d / "cfg.json").write_text(json.dumps({**json.loads((d / "cfg.json").read_text()),
                                                        "normalize_activations": "expected_average_only_in"})),
     "normalize_activations='expected_average_only_in'; valid: 'none'"),
    (lambda d: (d / "cfg.json").write_text(json.dumps({**json.loads((d / "cfg.json").read_text()),
                                                        "architecture": "gated"})), "architecture 'gated'"),
    (lambda d: (d / "sae_weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken"), "unreadable"),
    (lambda d: (d / "cfg.json").unlink(), "not an SAE directory"),
    (lambda d: (d / "cfg.json").write_text(json.dumps({**json.loads((d / "cfg.json").read_text()), "d_sae": 7})),
     r"W_enc is \(8, 16\); valid: \(8, 7\)"),
])
def test_a_bad_sae_directory_is_one_clear_error(tmp_path, change, message):
    from ft.core.errors import TargetError
    from ft.targets.sae_file import load_sae

    random_sae(8, 16).save(tmp_path / "s")
    change(tmp_path / "s")
    with pytest.raises(TargetError, match=message):
        load_sae(tmp_path / "s")


def test_a_planted_sae_latent_is_textualized_to_its_word(tiny, tiny_dir, tmp_path):
    """Encoder columns aligned with three words' own resid at layer 1: each latent's most
    activating word and its optimized input's closest word are that word; the post-activation
    is reported (ReLU of the pre-activation)."""
    from ft.model.vocab import load_or_sweep
    from ft.rundir.results import read_targets
    from ft.targets.sae_file import SAE
    from ft.train import run
    from tests.test_train import compose_cfg

    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    r = load_or_sweep(tiny, vocab, "resid", use_cache=False)[:, 1]  # [V', H]
    words = ["sofa", "violin", "mango"]
    H = r.shape[1]
    W_enc = torch.randn(H, 8) * 0.01
    W_enc[:, [2, 5, 6]] = r[[vocab.tokens.index(w) for w in words]].T
    SAE(W_enc, torch.zeros(8) - 0.5, torch.randn(8, H), torch.zeros(H)).save(tmp_path / "sae")
    cfg = compose_cfg([f"model.name_or_path={tiny_dir}", "target=sae", f"target.path={tmp_path / 'sae'}",
                       "target.site=layer.1.resid", "target.latents=[2,5,6]", "trainer.max_steps=150",
                       "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false", "logger.wandb.mode=disabled"])
    run(cfg, tmp_path / "run")
    df = read_targets(tmp_path / "run")
    assert list(df.kind) == ["sae"] * 3 and list(df.latent) == [2, 5, 6] and list(df.layer) == [1, 1, 1]
    assert list(df.most_activating_word) == words and [c[0] for c in df.closest_words] == words
    assert (df.sae_post - df.objective.clip(lower=0)).abs().max() < 1e-4
    # every latent names itself (not the SAE's site alone), in the table and wherever target_label is read
    from ft.rundir.results import target_label

    assert list(df.label) == [f"layer.1.resid:sae.{i}" for i in (2, 5, 6)]
    assert [target_label(r) for r in df.itertuples()] == list(df.label)
    old = df.assign(label=None)  # a run written before the label column: the same names
    assert [target_label(r) for r in old.itertuples()] == list(df.label)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    """A tiny random BERT sequence classifier with named labels (the tiny WordPiece tokenizer)."""
    from transformers import BertConfig, BertForSequenceClassification

    from tests.conftest import build_tiny

    path = build_tiny(tmp_path_factory.mktemp("clf"), seed=4)
    cfg = BertConfig.from_pretrained(path)
    cfg.num_labels, cfg.id2label = 3, {0: "neg", 1: "pos", 2: "neutral"}
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    cfg.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(4)
    BertForSequenceClassification(cfg).save_pretrained(path)
    return path


def test_a_class_logit_is_the_checkpoints_own_logit(classifier_dir, tmp_path):
    """`objective` of a logit target = the classifier's own forward on the saved input; the most
    activating word is the brute-force argmax over the vocabulary; labels resolve by name."""
    from transformers import BertForSequenceClassification

    from ft.rundir.results import read_inputs, read_targets
    from ft.train import run
    from tests.test_train import compose_cfg

    cfg = compose_cfg([f"model.name_or_path={classifier_dir}", "target=logits", "target.classes=[pos,0]",
                       "trainer.max_steps=20", "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false",
                       "logger.wandb.mode=disabled"])
    run(cfg, tmp_path / "run")
    df, inputs = read_targets(tmp_path / "run"), read_inputs(tmp_path / "run")
    assert list(df.kind) == ["logit", "logit"] and list(df.target_class) == [1, 0]
    assert list(df.class_label) == ["pos", "neg"] and list(df.label) == ["logit.1 (pos)", "logit.0 (neg)"]
    clf = BertForSequenceClassification.from_pretrained(classifier_dir).eval()
    enc = load_encoder(str(classifier_dir))
    vocab = Vocabulary.from_tokenizer(enc.tokenizer)
    W = clf.get_input_embeddings().weight.detach()
    with torch.no_grad():
        logits = clf(inputs_embeds=full_sequence(inputs["embeds"], W, vocab.cls_id, vocab.sep_id)).logits
        ids = torch.stack([torch.full((len(vocab.ids),), vocab.cls_id), vocab.ids,
                           torch.full((len(vocab.ids),), vocab.sep_id)], 1)
        per_word = clf(input_ids=ids).logits
    for t, c in enumerate([1, 0]):
        assert df.objective[t] == pytest.approx(float(logits[t, c]), rel=1e-5, abs=1e-5)
        assert df.most_activating_word[t] == vocab.tokens[int(per_word[:, c].argmax())]
        assert df.most_activating_word_activation[t] == pytest.approx(float(per_word[:, c].max()), rel=1e-5, abs=1e-5)
    assert df.objective[0] > df.most_activating_word_activation[0] - 1.0  # the optimized input climbed


def test_logits_need_a_classifier_and_a_known_class(tiny, classifier_dir):
    from ft.core.errors import TargetError
    from ft.targets import logit_targets

    with pytest.raises(TargetError, match="needs a fine-tuned sequence classifier"):
        logit_targets(tiny, None)
    with pytest.raises(TargetError, match=r"'maybe' is not a class .* labels \['neg', 'pos', 'neutral'\]"):
        logit_targets(load_encoder(str(classifier_dir)), ["maybe"])


def test_head_targets_rebuild_from_their_table(tiny):
    """ft.examples rebuilds a head's objective from `spec` (a head alone has no linear weights)."""
    import pandas as pd

    from ft.targets import readouts_of_table

    targets = neuron_targets(tiny.model, sites=["layer.0.head.1", "layer.1.ffn_out.2"])
    table = pd.DataFrame({"kind": [t.kind for t in targets], "spec": [t.spec for t in targets],
                          "sites": [t.reads for t in targets]})
    assert [t.label for t in targets] == ["layer.0.head.1", "layer.1.ffn_out.2"]
    rebuilt = readouts_of_table(tiny.model, table)
    assert rebuilt[0].norms == targets[0].readout.norms and rebuilt[0].weights == {}
    assert rebuilt[1].weights == targets[1].readout.weights


@pytest.mark.parametrize("fast", [True, False], ids=["lean", "hooked"])
def test_neurons_batched_with_heads_keep_finite_gradients(tiny, fast):
    """A head's norm is one row's term; a neuron row beside it has zeros in those slots, where the
    root's derivative is infinite: its gradient must still be its own (as beside another neuron)."""
    def grads(sites):
        m = module_of(tiny, [t.readout for t in neuron_targets(tiny.model, sites=sites)], fast)
        m().sum().backward()
        return next(p for p in m.parameters() if p.requires_grad).grad

    mixed = grads(["layer.0.ffn_out.3", "layer.1.head.1", "layer.1.ffn_out.7"])
    plain = grads(["layer.0.ffn_out.3", "layer.1.ffn_out.2", "layer.1.ffn_out.7"])
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed[[0, 2]], plain[[0, 2]], rtol=1e-5, atol=1e-7)
    assert mixed[1].abs().sum() > 0
