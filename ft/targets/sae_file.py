"""Sparse autoencoders in SAELens's saved layout, read without SAELens.

A directory with `cfg.json` and `sae_weights.safetensors` (`W_enc` [d_in, d_sae], `b_enc` [d_sae],
`W_dec` [d_sae, d_out], `b_dec` [d_out]; `threshold` [d_sae] for JumpReLU; `b_gate`, `b_mag`,
`r_mag` [d_sae] and no `b_enc` for gated SAEs). d_out = d_in except for transcoders.

Every cfg.json field that changes the encoding is applied or refused in one line (`load_sae`):
- `architecture`: standard, jumprelu, topk, abstopk, gated, and the transcoders (their encoder is
  a standard or JumpReLU one on the input site) are applied; batchtopk, matryoshka_batchtopk,
  matching_pursuit and temporal are refused (their encoding is not a function of one token's
  activation through one linear map per latent). Pre-6 files: no `architecture`, and
  `activation_fn_str` relu or topk with `activation_fn_kwargs.k`; any other activation is refused.
- `k` (or `activation_fn_kwargs.k`): the TopK / AbsTopK k.
- `rescale_acts_by_decoder_norm` (topk, abstopk): SAELens multiplies the pre-activation by
  ||W_dec[i]|| before the TopK; folded at load (W_enc[:, i] and b_enc[i] times the norm, W_dec[i]
  divided by it), so the pre-activation below is the one the TopK ranks and decode is unchanged.
- `apply_b_dec_to_input`; `finetuning_scaling_factor` (pre-6; a decoder-side scale, folded into W_dec).
- `normalize_activations` other than none, and `reshape_activations: hook_z`: refused (a factor
  not in the files, a per-token nonlinearity, or a per-head site ft does not have).
- Any other field must be one SAELens (or ft) writes that does not change the encoding
  (`INERT_FIELDS`); an unknown one is refused by name.

A latent's objective is its pre-activation, linear in the site's activation h:
  (h - b_dec if apply_b_dec_to_input) . W_enc[:, i] + b_enc[i]
(SAELens's hook_sae_acts_pre; for rescaled TopK times ||W_dec[i]||; for gated SAEs the magnitude
path, W_enc[:, i] exp(r_mag[i]) and b_mag[i]), so it is a `Readout` (a direction with a bias) and
runs on every reader. Its post-activation (`SAE.encode`: ReLU, JumpReLU, TopK or AbsTopK over all
latents, or ReLU gated by the gate path) is reported beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ft.core.errors import TargetError
from ft.targets.objectives import Readout, direction

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
ARCHITECTURES = ("standard", "jumprelu", "topk", "abstopk", "gated")  # what SAE.encode computes
TRANSCODERS = {"transcoder": "standard", "skip_transcoder": "standard", "jumprelu_transcoder": "jumprelu",
               "jumprelu_skip_transcoder": "jumprelu"}  # encoder on the input site; W_dec writes d_out
VALID = [*ARCHITECTURES, *TRANSCODERS]
REFUSED = {
    "batchtopk": "its TopK runs over the whole batch; save it with SAELens's save_inference_model (a jumprelu SAE)",
    "matryoshka_batchtopk": "its TopK runs over the whole batch; save it with save_inference_model (a jumprelu SAE)",
    "matching_pursuit": "its encoding is an iterative pursuit, not one linear map per latent",
    "temporal": "its encoding attends over the context, not one token's activation",
}
NORMALIZATIONS = {  # normalize_activations values ft cannot apply exactly, and why
    "expected_average_only_in": "the inputs were scaled by a dataset constant cfg.json does not hold; fold it into "
                                "the weights first (SAELens fold_activation_norm_scaling_factor)",
    "covariance_whitening": "the whitening statistics are not in the SAE files; fold them first "
                            "(SAELens fold_activation_whitening)",
    "layer_norm": "a per-token layer norm of the input: a latent is then not linear in the site",
    "constant_norm_rescale": "a per-token rescale of the input to norm sqrt(d_in): a latent is then not linear "
                             "in the site",
}
DTYPES = {"float32", "float16", "bfloat16", "float64", "float", "half", "double"}

# cfg.json fields that do not change the encoding: SAELens 6.54's SAE, training and runner configs
# (`SAEConfig`, `*TrainingSAEConfig`, `LanguageModelSAERunnerConfig`, `LoggingConfig`, metadata keys)
# and the keys of pre-6 files (`hook_point`, `hook_point_layer`, loss and schedule settings, ...).
INERT_FIELDS = frozenset("""
device dtype metadata sae_lens_version sae_lens_training_version model_name model_class_name hook_name
hook_layer hook_head_index hook_name_out hook_layer_out hook_head_index_out hf_hook_name hf_hook_name_out
hook_point hook_point_layer hook_point_head_index hook_point_eval hook_eval model_from_pretrained_kwargs
model_kwargs prepend_bos exclude_special_tokens neuronpedia_id context_size seqpos_slice dataset_path
dataset_trust_remote_code is_dataset_tokenized streaming use_cached_activations cached_activations_path
decoder_init_norm l1_coefficient lp_norm l1_warm_up_steps l0_coefficient l0_warm_up_steps target_l0
jumprelu_init_threshold jumprelu_bandwidth jumprelu_sparsity_loss_mode jumprelu_tanh_scale jumprelu_ste_to_input
pre_act_loss_coefficient use_sparse_activations aux_loss_coefficient topk_threshold_lr matryoshka_widths
use_matryoshka_aux_loss act_store_device activations_mixing_fraction adam_beta1 adam_beta2 autocast autocast_lm
checkpoint_path compile_llm compile_sae llm_compilation_mode sae_compilation_mode dead_feature_threshold
dead_feature_window disable_concat_sequences eval_batch_size_prompts feature_sampling_window from_pretrained_path
llm_device logger lr lr_decay_steps lr_end lr_scheduler_name lr_warm_up_steps n_batches_for_norm_estimate
n_batches_in_buffer n_checkpoints n_eval_batches n_restart_cycles output_path prefetch_llm_batches
resume_from_checkpoint save_final_checkpoint seed sequence_separator_token store_batch_size_prompts
store_batch_size train_batch_size_tokens training_tokens finetuning_tokens use_chat_formatting verbose
log_to_wandb log_activations_store_to_wandb log_optimizer_state_to_wandb log_weights_to_wandb wandb_project
wandb_entity wandb_id run_name wandb_log_frequency eval_every_n_wandb_logs resume tokens_per_buffer
b_dec_init_method expansion_factor noise_scale decoder_orthogonal_init decoder_heuristic_init
init_encoder_as_decoder_transpose normalize_sae_decoder mse_loss_normalization
scale_sparsity_penalty_by_decoder_norm finetuning_method use_ghost_grads total_training_steps
total_training_tokens train_batch_size feature_sampling_method resample_batches feature_reinit_scale
dead_feature_estimation_method corpus
""".split())  # `corpus` and keys starting with `ft_`: ft's own notes on the demo SAE
HANDLED_FIELDS = frozenset("""
architecture d_in d_sae d_out k activation_fn activation_fn_str activation_fn_kwargs apply_b_dec_to_input
rescale_acts_by_decoder_norm normalize_activations reshape_activations finetuning_scaling_factor
""".split())


@dataclass
class SAE:
    W_enc: torch.Tensor  # [d_in, d_sae] (gated: the gate path; the magnitude path is W_enc * exp(r_mag))
    b_enc: torch.Tensor  # [d_sae] (gated: b_mag)
    W_dec: torch.Tensor  # [d_sae, d_out]
    b_dec: torch.Tensor  # [d_out]
    architecture: str = "standard"  # one of VALID
    apply_b_dec_to_input: bool = True
    threshold: torch.Tensor | None = None  # [d_sae] JumpReLU
    k: int | None = None  # TopK, AbsTopK
    source: str = ""
    b_gate: torch.Tensor | None = None  # [d_sae] gated
    r_mag: torch.Tensor | None = None  # [d_sae] gated

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def activation(self) -> str:
        """The post-activation rule: one of ARCHITECTURES (a transcoder's is its encoder's)."""
        return TRANSCODERS.get(self.architecture, self.architecture)

    def sae_in(self, h: torch.Tensor) -> torch.Tensor:
        """[..., d_in]: what the encoder reads."""
        return h - self.b_dec if self.apply_b_dec_to_input else h

    def encoder(self) -> torch.Tensor:
        """[d_in, d_sae]: the linear map of the pre-activation (gated: the magnitude path)."""
        return self.W_enc * self.r_mag.exp() if self.activation == "gated" else self.W_enc

    def pre(self, h: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] pre-activations of h [..., d_in]."""
        return self.sae_in(h) @ self.encoder() + self.b_enc

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] post-activations (the SAE's features) of h [..., d_in]."""
        z = self.pre(h)
        if self.activation == "jumprelu":
            return z.relu() * (z > self.threshold)
        if self.activation == "topk":
            top = z.topk(self.k, dim=-1)
            return torch.zeros_like(z).scatter(-1, top.indices, top.values.relu())
        if self.activation == "abstopk":
            idx = z.abs().topk(self.k, dim=-1).indices
            return torch.zeros_like(z).scatter(-1, idx, z.gather(-1, idx))
        if self.activation == "gated":
            return z.relu() * (self.sae_in(h) @ self.W_enc + self.b_gate > 0)
        return z.relu()

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """[..., d_out] reconstruction of features f [..., d_sae]."""
        return f @ self.W_dec + self.b_dec

    def rescaled(self, s: float) -> SAE:
        """The same features for inputs s times larger (an SAE trained on x / s, for x)."""
        return SAE(self.W_enc / s, self.b_enc, self.W_dec * s, self.b_dec * s, self.architecture,
                   self.apply_b_dec_to_input, self.threshold, self.k, self.source, self.b_gate, self.r_mag)

    def readout(self, layer: int, point: str, latent: int) -> Readout:
        """Latent `latent`'s pre-activation at `point` of `layer`, as a Readout."""
        w = self.W_enc[:, latent] * (self.r_mag[latent].exp() if self.activation == "gated" else 1.0)  # [d_in]
        bias = float(self.b_enc[latent]) - (float(self.b_dec @ w) if self.apply_b_dec_to_input else 0.0)
        return direction(layer, point, w, bias=bias, name=f"layer.{layer}.{point}")

    def save(self, folder: Path, extra: dict | None = None) -> None:
        """Write the SAELens layout (what `load_sae` reads back to the same encoding)."""
        from ft.core.files import atomic_write
        from ft.core.integrity import save_tensors

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.activation == "gated":
            tensors |= {"b_mag": self.b_enc, "b_gate": self.b_gate, "r_mag": self.r_mag}
        else:
            tensors["b_enc"] = self.b_enc
        if self.activation == "jumprelu":
            tensors["threshold"] = self.threshold
        cfg = {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae,
               "apply_b_dec_to_input": self.apply_b_dec_to_input, "normalize_activations": "none",
               "reshape_activations": "none", "dtype": "float32",
               **({"k": self.k} if self.activation in ("topk", "abstopk") else {}),
               **({"d_out": self.W_dec.shape[1]} if self.architecture in TRANSCODERS else {}), **(extra or {})}
        atomic_write(folder / WEIGHTS, lambda p: save_tensors({k: v.contiguous() for k, v in tensors.items()}, p))
        atomic_write(folder / CFG, lambda p: p.write_text(json.dumps(cfg, indent=1)))


@dataclass(frozen=True)
class Encoding:
    """What cfg.json says about the encoding, checked."""

    architecture: str  # one of VALID
    apply_b_dec_to_input: bool
    k: int | None
    rescale: bool  # rescale_acts_by_decoder_norm (folded at load)
    finetuning_scaling_factor: bool
    d_in: int | None
    d_sae: int | None
    d_out: int | None


def load_sae(path: str | Path) -> SAE:
    """Read an SAE directory; TargetError (one line, naming the directory, the field, its value and
    what is valid) for anything ft cannot read exactly as SAELens encodes it."""
    folder = Path(str(path)).expanduser()
    where = f"target.path={str(folder)!r}"
    if not (folder / CFG).is_file() or not (folder / WEIGHTS).is_file():
        raise TargetError(f"{where}: not an SAE directory; valid: a folder with {CFG} and {WEIGHTS} (SAELens's layout)")
    enc = encoding_of(read_cfg(folder, where), where)
    return build(enc, read_weights(folder, where), where, str(folder))


def read_cfg(folder: Path, where: str) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / CFG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TargetError(f"{where}: {CFG} is not JSON ({e})") from None
    except OSError as e:
        raise TargetError(f"{where}: {CFG} is unreadable ({e.strerror or e})") from None
    if not isinstance(cfg, dict):
        raise TargetError(f"{where}: {CFG} holds a {type(cfg).__name__}; valid: a JSON object of SAELens config fields")
    return cfg


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def refuse(where: str, field: str, value: Any, valid: str) -> TargetError:
    return TargetError(f"{where}: {CFG} {field}={short(value)}; valid: {valid}")


def encoding_of(cfg: dict[str, Any], where: str) -> Encoding:
    """Check every field of cfg.json; the encoding it describes."""
    arch = architecture_of(cfg, where)  # first: a refused architecture is named before its own fields
    check_unknown_fields(cfg, where)
    check_normalization(cfg, where)
    check_reshape(cfg, where)
    check_dtype(cfg, where)
    if not isinstance(cfg.get("metadata") or {}, dict):
        raise refuse(where, "metadata", cfg["metadata"], "an object")
    d_sae = size(cfg, "d_sae", where)
    k = k_of(cfg, arch, d_sae, where)
    apply_b_dec = flag(cfg, "apply_b_dec_to_input", True, where)
    if arch in TRANSCODERS and apply_b_dec:
        raise refuse(where, "apply_b_dec_to_input", cfg.get("apply_b_dec_to_input", True),
                     f"false for architecture {arch!r} (its b_dec is on the output site)")
    rescale = flag(cfg, "rescale_acts_by_decoder_norm", False, where)
    if rescale and arch not in ("topk", "abstopk"):
        raise refuse(where, "rescale_acts_by_decoder_norm", True,
                     f"false for architecture {arch!r} (SAELens rescales only topk and abstopk)")
    d_in, d_out = size(cfg, "d_in", where), size(cfg, "d_out", where)
    if d_out is not None and arch not in TRANSCODERS and d_out != d_in:
        raise refuse(where, "d_out", d_out, f"d_in ({d_in}) or no d_out for architecture {arch!r} (only transcoders "
                                            "write another width)")
    return Encoding(arch, apply_b_dec, k, rescale, flag(cfg, "finetuning_scaling_factor", False, where),
                    d_in, d_sae, d_out)


def check_unknown_fields(cfg: dict[str, Any], where: str) -> None:
    for key, value in cfg.items():
        if key not in INERT_FIELDS and key not in HANDLED_FIELDS and not key.startswith("ft_"):
            raise TargetError(f"{where}: {CFG} field {key!r}={short(value)} is unknown, so it might change the "
                              "encoding; valid: the fields of SAELens's configs (INERT_FIELDS, HANDLED_FIELDS)")


def check_normalization(cfg: dict[str, Any], where: str) -> None:
    norm = cfg.get("normalize_activations", "none")
    if norm in ("none", None, False):
        return
    why = NORMALIZATIONS["expected_average_only_in"] if norm is True else NORMALIZATIONS.get(str(norm))
    raise refuse(where, "normalize_activations", norm, f"'none' ({why})" if why else
                 f"'none' (ft reads raw activations; SAELens knows {['none', *NORMALIZATIONS]})")


def check_reshape(cfg: dict[str, Any], where: str) -> None:
    reshape = cfg.get("reshape_activations")
    if reshape not in (None, "none"):
        raise refuse(where, "reshape_activations", reshape, "'none' (ft's sites are whole vectors, not hook_z's "
                                                            "per-head outputs)")
    if "reshape_activations" not in cfg:  # a pre-6 file: SAELens reshapes per head when the hook is a hook_z
        for key in ("hook_point", "hook_name"):
            if "hook_z" in str(cfg.get(key) or ""):
                raise refuse(where, key, cfg[key], "a whole-vector site (a pre-6 hook_z SAE is reshaped per head, "
                                                   "which ft's sites are not)")


def check_dtype(cfg: dict[str, Any], where: str) -> None:
    dtype = cfg.get("dtype")
    if dtype is not None and str(dtype).removeprefix("torch.") not in DTYPES:
        raise refuse(where, "dtype", dtype, f"one of {sorted(DTYPES)} (the weights are read as float32)")


def architecture_of(cfg: dict[str, Any], where: str) -> str:
    """The architecture, pre-6 activation_fn / activation_fn_str applied."""
    arch = cfg.get("architecture")
    if arch is not None and not isinstance(arch, str):
        raise refuse(where, "architecture", arch, f"one of {VALID}")
    if arch in REFUSED:
        raise refuse(where, "architecture", arch, f"one of {VALID} ({arch}: {REFUSED[arch]})")
    if arch is not None and arch not in VALID:
        raise refuse(where, "architecture", arch, f"one of {VALID}")
    fns = {key: cfg[key] for key in ("activation_fn", "activation_fn_str") if cfg.get(key) is not None}
    if len(set(map(str, fns.values()))) > 1:
        raise refuse(where, "activation_fn", fns["activation_fn"], f"the same as activation_fn_str "
                                                                   f"({short(fns['activation_fn_str'])})")
    for key, fn in fns.items():
        if fn not in ("relu", "topk"):
            raise refuse(where, key, fn, "'relu', or 'topk' with activation_fn_kwargs.k (SAELens 6 drops this field "
                                         "and would encode with ReLU)")
        if fn == "topk" and arch not in (None, "standard", "topk", "abstopk"):
            raise refuse(where, key, fn, f"'relu' for architecture {arch!r}")
        if fn == "topk" and arch in (None, "standard"):
            arch = "topk"
    return arch or "standard"


def k_of(cfg: dict[str, Any], arch: str, d_sae: int | None, where: str) -> int | None:
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise refuse(where, "activation_fn_kwargs", kwargs, "an object")
    allowed = {"k"} if arch in ("topk", "abstopk") else set()
    if set(kwargs) - allowed:
        raise refuse(where, "activation_fn_kwargs", kwargs, f"keys {sorted(allowed)} for architecture {arch!r}")
    if arch not in ("topk", "abstopk"):
        if cfg.get("k") is not None:
            raise refuse(where, "k", cfg["k"], f"no k for architecture {arch!r} (only topk and abstopk have one)")
        return None
    given = {key: v for key, v in (("k", cfg.get("k")), ("activation_fn_kwargs.k", kwargs.get("k"))) if v is not None}
    if len(set(map(repr, given.values()))) > 1:
        other = short(given["activation_fn_kwargs.k"])
        raise refuse(where, "k", given["k"], f"the same as activation_fn_kwargs.k ({other})")
    key, k = next(iter(given.items()), ("k", None))
    top = d_sae if d_sae is not None else "d_sae"
    if not (isinstance(k, int) and not isinstance(k, bool) and 0 < k and (d_sae is None or k <= d_sae)):
        raise refuse(where, key, k, f"an integer in 1..{top} ({arch} keeps the k largest latents)")
    return k


def flag(cfg: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise refuse(where, key, value, "true or false")
    return value


def size(cfg: dict[str, Any], key: str, where: str) -> int | None:
    value = cfg.get(key)
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise refuse(where, key, value, "a positive integer")
    return value


def read_weights(folder: Path, where: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        w = load_file(str(folder / WEIGHTS))
    except Exception as e:  # a cut-short or foreign file
        raise TargetError(f"{where}: {WEIGHTS} is unreadable ({str(e).splitlines()[0][:120]})") from None
    for name, t in w.items():
        if not t.dtype.is_floating_point:
            raise TargetError(f"{where}: {WEIGHTS} {name} is {t.dtype}; valid: a floating-point tensor")
    return {name: t.float() for name, t in w.items()}


def build(enc: Encoding, w: dict[str, torch.Tensor], where: str, source: str) -> SAE:
    """The SAE from checked fields and tensors: shapes checked, decoder norms and finetuning scale folded."""
    act = TRANSCODERS.get(enc.architecture, enc.architecture)
    need = ["W_enc", "W_dec", "b_dec"] + {"jumprelu": ["b_enc", "threshold"], "gated": ["b_gate", "b_mag", "r_mag"]
                                          }.get(act, ["b_enc"])
    missing = [n for n in need if n not in w]
    if missing:
        raise TargetError(f"{where}: {WEIGHTS} lacks {missing} for architecture {enc.architecture!r} "
                          f"(has {sorted(w)[:8]})")
    optional = ["scaling_factor", "finetuning_scaling_factor"] + (["W_skip"] if "skip" in enc.architecture else [])
    extra = sorted(set(w) - set(need) - set(optional))
    if extra:  # SAELens would refuse them too (load_state_dict is strict)
        raise TargetError(f"{where}: {WEIGHTS} holds {extra}, which architecture {enc.architecture!r} does not use; "
                          f"valid: {need + optional}")
    d_in = enc.d_in if enc.d_in is not None else w["W_enc"].shape[0]
    d_sae = enc.d_sae if enc.d_sae is not None else w["W_enc"].shape[-1]
    d_out = (enc.d_out or w["b_dec"].shape[-1]) if enc.architecture in TRANSCODERS else d_in
    per_latent = (d_sae,)
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_dec": (d_out,), "W_skip": (d_out, d_in)}
    for n in need + [n for n in ("W_skip", "scaling_factor", "finetuning_scaling_factor") if n in w]:
        want = shapes.get(n, per_latent)
        if tuple(w[n].shape) != want:
            raise TargetError(f"{where}: {n} is {tuple(w[n].shape)}; valid: {want} for d_in={d_in}, d_sae={d_sae}"
                              + (f", d_out={d_out}" if d_out != d_in else ""))
        if not torch.isfinite(w[n]).all():
            raise TargetError(f"{where}: {n} has non-finite values")
    W_enc, W_dec = w["W_enc"], fold_finetuning_scale(w, enc, where)
    b_enc = w["b_mag"] if act == "gated" else w["b_enc"]
    if enc.rescale:  # SAELens: hidden_pre * ||W_dec[i]|| before the TopK, feature / ||W_dec[i]|| in decode
        norm = W_dec.norm(dim=-1)  # [d_sae]
        W_enc, b_enc = W_enc * norm, b_enc * norm
        W_dec = torch.where(norm[:, None] > 0, W_dec / norm.clamp_min(1e-30)[:, None], W_dec)
    return SAE(W_enc, b_enc, W_dec, w["b_dec"], enc.architecture, enc.apply_b_dec_to_input,
               w["threshold"] if act == "jumprelu" else None,
               enc.k, source, w.get("b_gate"), w.get("r_mag"))


def fold_finetuning_scale(w: dict[str, torch.Tensor], enc: Encoding, where: str) -> torch.Tensor:
    """[d_sae, d_out] W_dec with a pre-6 finetuning scaling factor (decoder side only) folded in."""
    name = next((n for n in ("finetuning_scaling_factor", "scaling_factor") if n in w), None)
    if name is None or torch.equal(w[name], torch.ones_like(w[name])):
        return w["W_dec"]
    if not enc.finetuning_scaling_factor:
        raise refuse(where, "finetuning_scaling_factor", False, f"true, since {WEIGHTS} has a {name} other than 1 "
                                                                "(SAELens refuses this file too)")
    return w["W_dec"] * w[name][:, None]
