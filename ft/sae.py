"""Sparse autoencoders in SAELens's saved layout, read without SAELens.

A directory with `cfg.json` (`d_in`, `d_sae`, `architecture` = standard | jumprelu | topk, or
for older files `activation_fn_str` = relu | topk; `apply_b_dec_to_input`; `normalize_activations`,
which must be "none"; for topk `k` or `activation_fn_kwargs.k`) and `sae_weights.safetensors`
(`W_enc` [d_in, d_sae], `b_enc` [d_sae], `W_dec` [d_sae, d_in], `b_dec` [d_in], and `threshold`
[d_sae] for JumpReLU).

A latent's objective is its pre-activation, linear in the site's activation h:
  (h - b_dec if apply_b_dec_to_input) . W_enc[:, i] + b_enc[i]
so it is a `Readout` (a direction with a bias) and runs on every reader. Its post-activation
(ReLU, JumpReLU, or TopK over all latents) is reported beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ft.errors import TargetError
from ft.objectives import Readout, direction

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
ARCHITECTURES = ("standard", "jumprelu", "topk")


@dataclass
class SAE:
    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]
    architecture: str = "standard"
    apply_b_dec_to_input: bool = True
    threshold: torch.Tensor | None = None  # [d_sae] JumpReLU
    k: int | None = None  # TopK
    source: str = ""

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def pre(self, h: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] pre-activations of h [..., d_in]."""
        x = h - self.b_dec if self.apply_b_dec_to_input else h
        return x @ self.W_enc + self.b_enc

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] post-activations (the SAE's features)."""
        z = self.pre(h)
        if self.architecture == "jumprelu":
            return z * (z > self.threshold)
        if self.architecture == "topk":
            top = z.topk(self.k, dim=-1)
            return torch.zeros_like(z).scatter(-1, top.indices, top.values.relu())
        return z.relu()

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def rescaled(self, s: float) -> SAE:
        """The same features for inputs s times larger (an SAE trained on x / s, for x)."""
        return SAE(self.W_enc / s, self.b_enc, self.W_dec * s, self.b_dec * s, self.architecture,
                   self.apply_b_dec_to_input, self.threshold, self.k, self.source)

    def readout(self, layer: int, point: str, latent: int) -> Readout:
        """Latent `latent`'s pre-activation at `point` of `layer`, as a Readout."""
        w = self.W_enc[:, latent]
        bias = float(self.b_enc[latent]) - (float(self.b_dec @ w) if self.apply_b_dec_to_input else 0.0)
        return direction(layer, point, w, bias=bias, name=f"layer.{layer}.{point}")

    def save(self, folder: Path, extra: dict | None = None) -> None:
        """Write the SAELens layout (what `load_sae` reads)."""
        from ft.integrity import save_tensors
        from ft.results import atomic_write

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            tensors["threshold"] = self.threshold
        cfg = {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae,
               "apply_b_dec_to_input": self.apply_b_dec_to_input, "normalize_activations": "none",
               "dtype": "float32", **({"k": self.k} if self.k else {}), **(extra or {})}
        atomic_write(folder / WEIGHTS, lambda p: save_tensors({k: v.contiguous() for k, v in tensors.items()}, p))
        atomic_write(folder / CFG, lambda p: p.write_text(json.dumps(cfg, indent=1)))


def load_sae(path: str | Path) -> SAE:
    """Read an SAE directory; TargetError (one line, naming the directory and what is wrong)."""
    folder = Path(str(path)).expanduser()
    where = f"target.path={str(folder)!r}"
    if not (folder / CFG).is_file() or not (folder / WEIGHTS).is_file():
        raise TargetError(f"{where}: not an SAE directory; valid: a folder with {CFG} and {WEIGHTS} (SAELens's layout)")
    try:
        cfg = json.loads((folder / CFG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TargetError(f"{where}: {CFG} is not JSON ({e})") from None
    arch = cfg.get("architecture") or {"relu": "standard", "topk": "topk"}.get(cfg.get("activation_fn_str", "relu"))
    if arch not in ARCHITECTURES:
        given = arch or cfg.get("activation_fn_str")
        raise TargetError(f"{where}: architecture {given!r}; valid: {list(ARCHITECTURES)}")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise TargetError(f"{where}: normalize_activations={norm!r}; valid: 'none' (ft reads raw activations)")
    from safetensors.torch import load_file

    try:
        w = load_file(str(folder / WEIGHTS))
    except Exception as e:  # a cut-short or foreign file
        raise TargetError(f"{where}: {WEIGHTS} is unreadable ({str(e).splitlines()[0][:120]})") from None
    need = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    missing = [n for n in need if n not in w]
    if missing:
        raise TargetError(f"{where}: {WEIGHTS} lacks {missing} (has {sorted(w)[:8]})")
    d_in, d_sae = int(cfg.get("d_in", w["W_enc"].shape[0])), int(cfg.get("d_sae", w["W_enc"].shape[1]))
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,),
              "threshold": (d_sae,)}
    for n in need:
        if tuple(w[n].shape) != shapes[n]:
            raise TargetError(f"{where}: {n} is {tuple(w[n].shape)}; valid: {shapes[n]} for d_in={d_in}, d_sae={d_sae}")
        if not torch.isfinite(w[n]).all():
            raise TargetError(f"{where}: {n} has non-finite values")
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k")) if arch == "topk" else None
    if arch == "topk" and not (isinstance(k, int) and 0 < k <= d_sae):
        raise TargetError(f"{where}: topk needs k (cfg.json 'k' or activation_fn_kwargs.k) in 1..{d_sae}; got {k!r}")
    return SAE(w["W_enc"].float(), w["b_enc"].float(), w["W_dec"].float(), w["b_dec"].float(), arch,
               bool(cfg.get("apply_b_dec_to_input", True)), w["threshold"].float() if arch == "jumprelu" else None,
               k, str(folder))
