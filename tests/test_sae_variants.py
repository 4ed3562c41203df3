"""ft's SAE reading against SAELens's own: each variant built with SAELens's classes (random weights,
non-zero biases, thresholds of both signs, decoder rows of varied norms), saved with its `save_model`,
read by `ft.targets.sae_file.load_sae`, and compared on random inputs with SAELens's `encode` (post-activation)
and its `hook_sae_acts_pre` (pre-activation; ft's objective). Every field ft cannot apply exactly
is refused in one line naming it; those cases also run from hand-written files without SAELens.

`pytest tests/test_sae_variants.py -s` prints the variant table (max abs differences)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ft.core.errors import TargetError
from ft.targets.sae_file import SAE, load_sae

D_IN, D_SAE, D_OUT, K = 16, 48, 12, 6
TABLE: list[tuple[str, str, float, float]] = []


@pytest.fixture(scope="module", autouse=True)
def variant_table():
    yield
    if TABLE:
        print("\nvariant | saved with | max |objective - SAELens| | max |post - SAELens|")
        for row in TABLE:
            print(f"{row[0]} | {row[1]} | {row[2]:.2e} | {row[3]:.2e}")


@pytest.fixture(scope="module")
def sae_lens():
    os.environ["HF_HUB_OFFLINE"] = "1"  # importing it must not reach the hub
    return pytest.importorskip("sae_lens")


def inputs(seed: int = 0) -> torch.Tensor:
    """[4, 9, D_IN] activations of a site, not centred (so b_dec matters)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 9, D_IN, generator=g) * 2 + 0.5


def randomize(sae, seed: int = 1) -> None:
    """Random weights in place: biases non-zero, decoder rows of norms 0.2..3.2, thresholds of both signs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 1 / p.shape[0] ** 0.5))
        sae.W_dec.mul_(0.2 + 3 * torch.rand(sae.W_dec.shape[0], 1, generator=g))
        if hasattr(sae, "threshold") and isinstance(sae.threshold, torch.nn.Parameter):
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=g) * 1.0 - 0.2)


def lens_readings(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens's (hook_sae_acts_pre, encode) of x."""
    seen = []
    handle = sae.hook_sae_acts_pre.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            post = sae.encode(x)
    finally:
        handle.remove()
    return seen[0], (post.to_dense() if post.is_sparse else post).detach()


def readout_objective(sae: SAE, x: torch.Tensor, latents: list[int]) -> torch.Tensor:
    """[..., len(latents)]: each latent's `SAE.readout` (the objective ft optimizes) on x."""
    cols = []
    for i in latents:
        r = sae.readout(3, "resid", i)
        w = torch.tensor([r.weights[s] for s in sorted(r.weights, key=lambda s: s.unit)], dtype=torch.float64)
        cols.append(x.double() @ w + r.bias)
    return torch.stack(cols, -1)


def compare(name: str, how: str, lens, folder: Path, pre_scale: torch.Tensor | None = None) -> SAE:
    """ft's reading of `folder` against SAELens's `lens`; one table row. `pre_scale` [d_sae]: what
    ft's pre-activation is in units of SAELens's hook_sae_acts_pre (the decoder norms when rescaled)."""
    ft = load_sae(folder)
    x = inputs()
    lens_pre, lens_post = lens_readings(lens, x)
    want_pre = lens_pre * pre_scale if pre_scale is not None else lens_pre
    post = ft.encode(x)
    latents = [0, 7, D_SAE - 1]
    objective = readout_objective(ft, x, latents)
    d_obj = float((objective - want_pre[..., latents].double()).abs().max())
    d_pre = float((ft.pre(x) - want_pre).abs().max())
    d_post = float((post - lens_post).abs().max())
    TABLE.append((name, how, max(d_obj, d_pre), d_post))
    scale = float(want_pre.abs().max())
    assert d_pre <= 1e-5 * scale and d_obj <= 1e-5 * scale, (name, d_pre, d_obj)
    assert d_post <= 1e-5 * scale, (name, d_post)
    assert torch.equal(post != 0, lens_post != 0), name  # the same active set
    assert (lens_post != 0).any() and (lens_post == 0).any(), name  # not a vacuous comparison
    return ft


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_standard(sae_lens, tmp_path, apply_b_dec):
    lens = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=apply_b_dec))
    randomize(lens)
    lens.save_model(tmp_path)
    compare(f"standard (apply_b_dec_to_input={apply_b_dec})", "StandardSAE.save_model", lens, tmp_path)


def test_jumprelu_with_thresholds_of_both_signs(sae_lens, tmp_path):
    """SAELens's JumpReLU is ReLU(z) where z > threshold: a negative threshold does not pass z < 0."""
    lens = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
    randomize(lens)
    assert (lens.threshold < 0).any()
    lens.save_model(tmp_path)
    compare("jumprelu (thresholds -0.2..0.8)", "JumpReLUSAE.save_model", lens, tmp_path)


def test_jumprelu_training_sae(sae_lens, tmp_path):
    lens = sae_lens.JumpReLUTrainingSAE(sae_lens.JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE))
    randomize(lens)
    with torch.no_grad():
        lens.threshold.clamp_(min=0)  # as its training step keeps it
    lens.save_model(tmp_path)  # the training config: loss settings and training metadata beside the encoding
    compare("jumprelu, training config", "JumpReLUTrainingSAE.save_model", lens.eval(), tmp_path)


@pytest.mark.parametrize("arch", ["topk", "abstopk"])
@pytest.mark.parametrize("rescale", [False, True])
def test_topk_and_abstopk(sae_lens, tmp_path, arch, rescale):
    """With rescale_acts_by_decoder_norm, SAELens ranks hidden_pre * ||W_dec[i]||: ft's objective is that
    product and its active set SAELens's; reading the file without the rescale would not be."""
    cls, cfg_cls = ((sae_lens.TopKSAE, sae_lens.TopKSAEConfig) if arch == "topk"
                    else (sae_lens.AbsTopKSAE, sae_lens.AbsTopKSAEConfig))
    lens = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale))
    randomize(lens)
    lens.save_model(tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["rescale_acts_by_decoder_norm"] is rescale
    norms = lens.W_dec.detach().norm(dim=-1) if rescale else None
    ft = compare(f"{arch} (rescale_acts_by_decoder_norm={str(rescale).lower()})", f"{cls.__name__}.save_model",
                 lens, tmp_path, pre_scale=norms)
    assert ((ft.encode(inputs()) != 0).sum(-1) == K).all()
    # decode stays SAELens's: the fold moved the norms from W_dec to W_enc
    f = ft.encode(inputs())
    torch.testing.assert_close(ft.decode(f), lens.decode(f).detach(), rtol=1e-5, atol=1e-5)
    if rescale:  # the defect this guards: the file read as if not rescaled
        naive = SAE(lens.W_enc.detach(), lens.b_enc.detach(), lens.W_dec.detach(), lens.b_dec.detach(), arch, True,
                    k=K)
        lens_pre, lens_post = lens_readings(lens, inputs())
        assert not torch.equal(naive.encode(inputs()) != 0, lens_post != 0)
        TABLE.append((f"{arch} rescaled, read without the rescale (the defect)", "for comparison",
                      float((naive.pre(inputs()) - lens_pre * norms).abs().max()),
                      float((naive.encode(inputs()) - lens_post).abs().max())))


def test_topk_training_sae_saved_unfolded(sae_lens, tmp_path):
    """A TopK training SAE (rescale on by default) saved with save_model: the norms are not folded."""
    lens = sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    randomize(lens)
    lens.save_model(tmp_path)
    compare("topk (rescale true), training config", "TopKTrainingSAE.save_model", lens.eval(), tmp_path,
            pre_scale=lens.W_dec.detach().norm(dim=-1))


def test_topk_training_sae_saved_for_inference(sae_lens, tmp_path):
    lens = sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    randomize(lens)
    lens.save_inference_model(tmp_path)  # folds the norms, writes rescale false
    compare("topk, norms folded", "TopKTrainingSAE.save_inference_model", lens.eval(), tmp_path,
            pre_scale=lens.W_dec.detach().norm(dim=-1))


def test_gated(sae_lens, tmp_path):
    lens = sae_lens.GatedSAE(sae_lens.GatedSAEConfig(d_in=D_IN, d_sae=D_SAE))
    randomize(lens)
    lens.save_model(tmp_path)
    compare("gated", "GatedSAE.save_model", lens, tmp_path)


@pytest.mark.parametrize("name", ["Transcoder", "JumpReLUTranscoder", "SkipTranscoder"])
def test_transcoders_encode_their_input_site(sae_lens, tmp_path, name):
    cls, cfg_cls = getattr(sae_lens, name), getattr(sae_lens, f"{name}Config")
    lens = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False))
    randomize(lens)
    lens.save_model(tmp_path)
    ft = compare(f"{lens.cfg.architecture()} (d_out={D_OUT})", f"{name}.save_model", lens, tmp_path)
    assert ft.W_dec.shape == (D_SAE, D_OUT)


def test_batchtopk_saved_for_inference_is_a_jumprelu(sae_lens, tmp_path):
    lens = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    randomize(lens)
    lens.topk_threshold = torch.tensor(0.4)
    lens.save_inference_model(tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == "jumprelu"
    inference = sae_lens.SAE.load_from_disk(tmp_path)  # SAELens's own reading of what it wrote
    compare("batchtopk -> jumprelu", "BatchTopKTrainingSAE.save_inference_model", inference, tmp_path)


def test_a_roundtrip_through_ft_save_is_read_by_saelens_alike(sae_lens, tmp_path):
    lens = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True))
    randomize(lens)
    lens.save_model(tmp_path / "a")
    load_sae(tmp_path / "a").save(tmp_path / "b")  # the rescale folded: rescale false, same encoding
    back = sae_lens.SAE.load_from_disk(tmp_path / "b")
    x = inputs()
    torch.testing.assert_close(back.encode(x).detach(), lens_readings(lens, x)[1], rtol=1e-5, atol=1e-5)
    compare("topk rescaled, re-saved by ft", "SAE.save (ft)", back, tmp_path / "b")


def write_pre6(folder: Path, cfg: dict, seed: int = 3, scaling_factor: torch.Tensor | None = None) -> dict:
    """A pre-6 SAELens directory written by hand (no sae_lens_version): its tensors."""
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(D_IN, D_SAE, generator=g) / 4, "b_enc": torch.randn(D_SAE, generator=g) * 0.3,
         "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g) * 0.3}
    if scaling_factor is not None:
        w["scaling_factor"] = scaling_factor
    folder.mkdir(parents=True, exist_ok=True)
    save_file(w, str(folder / "sae_weights.safetensors"))
    base = {"d_in": D_IN, "d_sae": D_SAE, "model_name": "gpt2", "hook_point": "blocks.4.hook_resid_pre",
            "hook_point_layer": 4, "context_size": 128, "dataset_path": "Skylion007/openwebtext", "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": False,
            "sae_lens_training_version": "3.5.0", "neuronpedia_id": None}
    (folder / "cfg.json").write_text(json.dumps({**base, **cfg}))
    return w


def test_pre6_topk_file(sae_lens, tmp_path):
    write_pre6(tmp_path, {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}})
    lens = sae_lens.SAE.load_from_disk(tmp_path)
    assert lens.cfg.architecture() == "topk"
    compare("pre-6 topk (activation_fn_str)", "hand-written 5.x cfg.json", lens, tmp_path)


GPT2_SMALL_RES_JB = {  # the cfg.json of SAELens's release gpt2-small-res-jb (3.x), widths shrunk
    "activation_fn_str": "relu", "apply_b_dec_to_input": True, "architecture": "standard", "model_name": "gpt2-small",
    "hook_point": "blocks.0.hook_resid_pre", "hook_point_layer": 0, "hook_point_head_index": None,
    "dataset_path": "Skylion007/openwebtext", "dataset_trust_remote_code": True, "is_dataset_tokenized": False,
    "context_size": 128, "use_cached_activations": False, "cached_activations_path": "activations/x",
    "d_in": D_IN, "n_batches_in_buffer": 128, "total_training_tokens": 300000000, "store_batch_size": 32,
    "device": "mps", "seed": 42, "dtype": "torch.float32", "b_dec_init_method": "geometric_median",
    "expansion_factor": 3, "from_pretrained_path": None, "l1_coefficient": 8e-05, "lr": 0.0004,
    "lr_scheduler_name": None, "lr_warm_up_steps": 5000,
    "model_from_pretrained_kwargs": {"center_writing_weights": True},
    "train_batch_size": 4096, "use_ghost_grads": False, "feature_sampling_window": 1000,
    "finetuning_scaling_factor": False, "feature_sampling_method": None, "resample_batches": 1028,
    "feature_reinit_scale": 0.2, "dead_feature_window": 5000, "dead_feature_estimation_method": "no_fire",
    "dead_feature_threshold": 1e-08, "log_to_wandb": True, "wandb_project": "p", "wandb_entity": None,
    "wandb_log_frequency": 100, "n_checkpoints": 10, "checkpoint_path": "checkpoints/y1t51byy", "d_sae": D_SAE,
    "tokens_per_buffer": 67108864, "run_name": "r", "neuronpedia_id": "gpt2-small/0-res-jb",
    "normalize_activations": "none", "prepend_bos": True, "sae_lens_training_version": None,
}


def test_a_released_pre6_cfg_is_read(sae_lens, tmp_path):
    write_pre6(tmp_path, GPT2_SMALL_RES_JB)
    compare("standard, a 3.x release's cfg.json", "gpt2-small-res-jb's fields", sae_lens.SAE.load_from_disk(tmp_path),
            tmp_path)


def test_pre6_finetuning_scale_is_folded_into_the_decoder(tmp_path):
    s = torch.linspace(0.5, 2.0, D_SAE)
    w = write_pre6(tmp_path, {"activation_fn_str": "relu", "finetuning_scaling_factor": True}, scaling_factor=s)
    ft = load_sae(tmp_path)
    f = ft.encode(inputs())
    torch.testing.assert_close(ft.decode(f), (f * s) @ w["W_dec"] + w["b_dec"])
    torch.testing.assert_close(ft.encode(inputs()), ((inputs() - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu())


def test_rescaled_topk_from_a_hand_written_file(tmp_path):
    """Without SAELens: the rescale applied as SAELens's TopKSAE.encode defines it."""
    w = write_pre6(tmp_path, {"architecture": "topk", "k": K, "rescale_acts_by_decoder_norm": True})
    ft = load_sae(tmp_path)
    x = inputs()
    z = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * w["W_dec"].norm(dim=-1)
    top = z.topk(K, dim=-1)
    want = torch.zeros_like(z).scatter(-1, top.indices, top.values.relu())
    torch.testing.assert_close(ft.pre(x), z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ft.encode(x), want, rtol=1e-5, atol=1e-5)


def test_hand_written_field_values_are_refused_in_one_line(tmp_path):
    """Without SAELens: each field that would change the encoding in a way ft cannot apply."""
    cases = {
        "activation_fn_str='tanh-relu'": {"activation_fn_str": "tanh-relu"},
        "normalize_activations=True": {"normalize_activations": True},
        "normalize_activations='layer_norm'": {"normalize_activations": "layer_norm"},
        "normalize_activations='constant_norm_rescale'": {"normalize_activations": "constant_norm_rescale"},
        "normalize_activations='expected_average_only_in'": {"normalize_activations": "expected_average_only_in"},
        "normalize_activations='covariance_whitening'": {"normalize_activations": "covariance_whitening"},
        "normalize_activations='sometimes'": {"normalize_activations": "sometimes"},
        "hook_point='blocks.4.attn.hook_z'": {"hook_point": "blocks.4.attn.hook_z"},
        "reshape_activations='hook_z'": {"reshape_activations": "hook_z"},
        "architecture='matching_pursuit'": {"architecture": "matching_pursuit"},
        "architecture='temporal'": {"architecture": "temporal"},
        "architecture='batchtopk'": {"architecture": "batchtopk", "k": K},
        "architecture='moe'": {"architecture": "moe"},
        "rescale_acts_by_decoder_norm=True; valid: false for architecture 'standard'":
            {"rescale_acts_by_decoder_norm": True},
        "k=6; valid: the same as activation_fn_kwargs.k (5)":
            {"architecture": "topk", "k": K, "activation_fn_kwargs": {"k": 5}},
        "k=0; valid: an integer in 1..48": {"architecture": "topk", "k": 0},
        "activation_fn_kwargs.k=True": {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": True}},
        "activation_fn_kwargs={'alpha': 2}": {"activation_fn_kwargs": {"alpha": 2}},
        "k=6; valid: no k for architecture 'jumprelu'": {"architecture": "jumprelu", "k": K},
        "apply_b_dec_to_input='yes'": {"apply_b_dec_to_input": "yes"},
        "d_in='abc'; valid: a positive integer": {"d_in": "abc"},
        "d_sae=48.5; valid: a positive integer": {"d_sae": 48.5},
        "dtype='int8'": {"dtype": "int8"},
        "field 'activation_scale'=3.0 is unknown": {"activation_scale": 3.0},
        "metadata='gpt2'; valid: an object": {"metadata": "gpt2"},
    }
    for i, (message, cfg) in enumerate(cases.items()):
        write_pre6(tmp_path / str(i), cfg)
        with pytest.raises(TargetError) as e:
            load_sae(tmp_path / str(i))
        assert message in str(e.value) and "\n" not in str(e.value), (message, str(e.value))


@pytest.mark.parametrize("text,message", [
    ("[1, 2]", "cfg.json holds a list; valid: a JSON object"),
    ('"standard"', "cfg.json holds a str"),
    ("{not json", "cfg.json is not JSON"),
])
def test_a_cfg_that_is_not_an_object_is_one_line(tmp_path, text, message):
    write_pre6(tmp_path, {})
    (tmp_path / "cfg.json").write_text(text)
    with pytest.raises(TargetError, match=message):
        load_sae(tmp_path)


def test_weights_the_architecture_does_not_use_are_refused(tmp_path):
    write_pre6(tmp_path, {"architecture": "standard"})
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    save_file({**w, "threshold": torch.zeros(D_SAE)}, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(TargetError, match=r"holds \['threshold'\], which architecture 'standard' does not use"):
        load_sae(tmp_path)


def test_a_finetuning_scale_the_cfg_disowns_is_refused(tmp_path):
    write_pre6(tmp_path, {}, scaling_factor=torch.full((D_SAE,), 2.0))
    with pytest.raises(TargetError, match="finetuning_scaling_factor=False; valid: true"):
        load_sae(tmp_path)


@pytest.mark.parametrize("cfg,field", [
    ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
    ({"normalize_activations": "constant_norm_rescale"}, "normalize_activations='constant_norm_rescale'"),
    ({"normalize_activations": "expected_average_only_in"}, "normalize_activations='expected_average_only_in'"),
    ({"normalize_activations": "covariance_whitening"}, "normalize_activations='covariance_whitening'"),
    ({"reshape_activations": "hook_z"}, "reshape_activations='hook_z'"),
])
def test_saelens_saves_ft_cannot_apply_are_refused(sae_lens, tmp_path, cfg, field):
    lens = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, **cfg))
    randomize(lens)
    lens.save_model(tmp_path)
    with pytest.raises(TargetError) as e:
        load_sae(tmp_path)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_saelens_reads_a_tanh_relu_file_as_relu_and_ft_refuses_it(sae_lens, tmp_path):
    """The pre-6 activation SAELens 6 drops without a word: ft names it instead."""
    w = write_pre6(tmp_path, {"activation_fn_str": "tanh-relu"})
    lens = sae_lens.SAE.load_from_disk(tmp_path)
    x = inputs()
    torch.testing.assert_close(lens.encode(x).detach(), ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu())
    with pytest.raises(TargetError, match="activation_fn_str='tanh-relu'; valid: 'relu', or 'topk'"):
        load_sae(tmp_path)


def test_batchtopk_training_save_is_refused(sae_lens, tmp_path):
    lens = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    lens.save_model(tmp_path)
    with pytest.raises(TargetError, match="architecture='batchtopk'; valid: one of .*save_inference_model"):
        load_sae(tmp_path)


@pytest.mark.parametrize("field,value", [
    ("architecture", ["standard"]), ("architecture", {"name": "topk"}), ("normalize_activations", ["none"]),
    ("reshape_activations", {"z": 1}), ("activation_fn_str", ["relu"]), ("dtype", ["float32"]),
    ("activation_fn_kwargs", [6]), ("k", "6"), ("d_out", -1), ("finetuning_scaling_factor", "no"),
])
def test_a_field_of_the_wrong_type_is_one_line(tmp_path, field, value):
    write_pre6(tmp_path, {"architecture": "topk", "k": K} if field != "architecture" else {})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(TargetError) as e:
        load_sae(tmp_path)
    assert f"{field}=" in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_the_demo_sae_trains_is_one_line_and_caches_nothing(signum, tiny_dir, tmp_path):
    """ft.train's convention: exit 128 + signum, one line saying what stopped and how to resume,
    and no demo SAE in the cache (a half-trained one would be served to every later run)."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {
        "WANDB_MODE": "offline", "FT_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ft.train", "experiment=sae_demo", f"model.name_or_path={tiny_dir}",
           "target.demo.steps=1000000", "trainer.max_steps=5", "+trainer.enable_progress_bar=false",
           f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log, deadline = run_dir / "train.log", time.time() + 240
    while proc.poll() is None and time.time() < deadline and "training a demo SAE" not in (
            log.read_text() if log.exists() else ""):
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    time.sleep(1.0)  # some steps in
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    last = err.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert last.startswith(f"interrupted: {name} while training the demo SAE for layer.1.resid (step "), last
    assert "nothing of it was saved" in last and "resume with: python -m ft.train " in last, last
    assert "Traceback" not in err, err[-2000:]
    assert not (cache / "sae").exists() or not any((cache / "sae").iterdir())  # neither whole nor half
    assert not (run_dir / "targets.parquet").exists()


def test_the_demo_sae_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from ft.targets.sae_demo import save_whole

    g = torch.Generator().manual_seed(0)
    sae = SAE(torch.randn(D_IN, D_SAE, generator=g), torch.randn(D_SAE, generator=g),
              torch.randn(D_SAE, D_IN, generator=g), torch.randn(D_IN, generator=g))
    folder = tmp_path / "sae" / "entry"
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text("{damaged")  # a damaged cache entry is replaced as a whole
    save_whole(sae, folder, {"ft_quality": {"l0": 1.0}})
    torch.testing.assert_close(load_sae(folder).encode(inputs()), sae.encode(inputs()))
    assert [p.name for p in (tmp_path / "sae").iterdir()] == ["entry"]

    def dies_half_way(self, tmp, extra=None):
        (Path(tmp) / "sae_weights.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (Path(tmp) / "sae_weights.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SAE, "save", dies_half_way)
    with pytest.raises(OSError):
        save_whole(sae, tmp_path / "sae" / "other", {})
    assert [p.name for p in (tmp_path / "sae").iterdir()] == ["entry"]  # no half entry, no temporary left


@pytest.mark.parametrize("fast", [True, False], ids=["lean", "hooked"])
@pytest.mark.parametrize("variant", ["topk-rescaled", "abstopk-rescaled", "gated", "jumprelu"])
def test_the_objective_on_a_site_is_saelens_pre_activation(sae_lens, tiny, tmp_path, variant, fast):
    """The textualization's objective (ft's readers at layer.1.resid of the tiny BERT) equals
    SAELens's pre-activation of the same activations (times ||W_dec[i]|| where it rescales)."""
    from ft.targets import sae_targets
    from tests.test_objectives import hf_points
    from tests.test_units import module_of

    H = tiny.model.config.hidden_size
    arch, rescale = variant.split("-")[0], variant.endswith("rescaled")
    cls, cfg_cls = {"topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
                    "abstopk": (sae_lens.AbsTopKSAE, sae_lens.AbsTopKSAEConfig),
                    "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig),
                    "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig)}[arch]
    extra = {"k": K, "rescale_acts_by_decoder_norm": True} if rescale else {}
    lens = cls(cfg_cls(d_in=H, d_sae=D_SAE, **extra))
    randomize(lens)
    lens.save_model(tmp_path)
    latents = [0, 5, 17, D_SAE - 1]
    targets = sae_targets(tiny.model, load_sae(tmp_path), "layer.1.resid", latents=latents)
    m = module_of(tiny, [t.readout for t in targets], fast)
    with torch.no_grad():
        got = m()  # [rows]
        h = hf_points(tiny.model, m.reading(slice(None)).seq)[(1, "resid")]  # [rows, H]
    lens_pre, lens_post = lens_readings(lens, h)
    if rescale:
        lens_pre = lens_pre * lens.W_dec.detach().norm(dim=-1)
    want = lens_pre[torch.arange(len(latents)), latents]
    ft_post = load_sae(tmp_path).encode(h)
    d_obj, d_post = float((got - want).abs().max()), float((ft_post - lens_post).abs().max())
    TABLE.append((f"{variant} on layer.1.resid ({'lean' if fast else 'hooked'} reader)", f"{cls.__name__}.save_model",
                  d_obj, d_post))
    assert d_obj <= 1e-4 * float(want.abs().max()) and d_post <= 1e-5 * float(lens_post.abs().max()), (d_obj, d_post)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "abstopk", "gated", "transcoder",
                                  "jumprelu_transcoder"])
def test_ft_save_and_load_round_trip_exactly(tmp_path, arch):
    g = torch.Generator().manual_seed(5)
    d_out = D_OUT if "transcoder" in arch else D_IN
    per = lambda: torch.randn(D_SAE, generator=g) * 0.3  # noqa: E731
    sae = SAE(torch.randn(D_IN, D_SAE, generator=g) / 4, per(), torch.randn(D_SAE, d_out, generator=g),
              torch.randn(d_out, generator=g), arch, "transcoder" not in arch,
              per() if "jumprelu" in arch else None, K if "topk" in arch else None,
              b_gate=per() if arch == "gated" else None, r_mag=per() if arch == "gated" else None)
    sae.save(tmp_path)
    back, x = load_sae(tmp_path), inputs()
    assert back.architecture == arch and back.W_dec.shape == (D_SAE, d_out)
    assert torch.equal(back.pre(x), sae.pre(x)) and torch.equal(back.encode(x), sae.encode(x))
    assert torch.equal(back.decode(sae.encode(x)), sae.decode(sae.encode(x)))


@pytest.mark.parametrize("name,arch,extra", [("MatchingPursuitSAE", "matching_pursuit", {}),
                                             ("TemporalSAE", "temporal", {"n_heads": 2, "bottleneck_factor": 4})])
def test_saelens_architectures_ft_cannot_apply_are_named(sae_lens, tmp_path, name, arch, extra):
    lens = getattr(sae_lens, name)(getattr(sae_lens, f"{name}Config")(d_in=D_IN, d_sae=D_SAE, **extra))
    lens.save_model(tmp_path)
    with pytest.raises(TargetError, match=f"architecture='{arch}'; valid: one of .*standard.*"):
        load_sae(tmp_path)
