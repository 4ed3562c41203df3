"""Parameterizations of the trainable input: the only trainable tensor of a run.

Each holds one row per target and maps it into the embedding space consumed by the
encoder (``inputs_embeds``), for the l optimized positions between [CLS] and [SEP].
Initialization is per target id, so a target starts from the same point whatever batch,
shard or device it lands in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ft.core.errors import ConfigError

KINDS = ("onehot", "embedding", "softmax", "gumbel")


def initial_row(tid: int, length: int, vocab_size: int, std: float, seed: int) -> torch.Tensor:
    """x0 ~ N(0, std^2) in the one-hot input space for target `tid`: [length, vocab]."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + int(tid))
    return torch.randn(length, vocab_size, generator=g) * std


def initial_onehot(
    target_ids: Sequence[int], length: int, vocab_size: int, std: float, seed: int
) -> torch.Tensor:
    """x0 for every target: [targets, length, vocab]."""
    if length < 1:
        raise ConfigError(f"input.length={length}; valid: an integer >= 1")
    return torch.stack([initial_row(t, length, vocab_size, std, seed) for t in target_ids])


def initial_embeds(
    target_ids: Sequence[int], length: int, W: torch.Tensor, std: float, seed: int
) -> torch.Tensor:
    """x0 · W for every target, one row at a time (never holds [targets, vocab])."""
    if length < 1:
        raise ConfigError(f"input.length={length}; valid: an integer >= 1")
    W = W.detach().float().cpu()
    return torch.stack([initial_row(t, length, W.shape[0], std, seed) @ W for t in target_ids])


class InputParam(nn.Module):
    """Base: `embeds(W, rows)` gives the embedding-space input [rows, length, hidden]."""

    name: str = "base"
    probabilistic: bool = False  # True: a distribution over the vocabulary per token

    def logits(self) -> torch.Tensor | None:
        """[T, l, vocab] scores whose argmax is the discrete readout (probabilistic kinds)."""
        return None

    def embeds(self, word_embeddings: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        raise NotImplementedError

    def extra_tensors(self, word_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors besides `embeds` worth saving in inputs.safetensors."""
        return {}

    def discrete_ids(self, word_embeddings: torch.Tensor) -> torch.Tensor | None:
        """[T, l] the token ids the input stands for, for inputs that are tokens (else None)."""
        return None

    @property
    def param(self) -> nn.Parameter:
        [p] = list(self.parameters())
        return p

    def set_rows(self, value: torch.Tensor) -> None:
        """Replace the trainable tensor (a shard of rows, or all rows gathered back)."""
        name = next(n for n, _ in self.named_parameters())
        setattr(self, name, nn.Parameter(value.detach().clone()))


class OneHotInput(InputParam):
    """The paper's input space, literally: x in R^{vocab}, e = x · W_word (Poerner's "logits")."""

    name = "onehot"

    def __init__(self, x0: torch.Tensor, save_raw: bool = False):
        super().__init__()
        self.x = nn.Parameter(x0.clone())
        self.save_raw = save_raw

    def embeds(self, word_embeddings: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        return self.x[rows] @ word_embeddings.to(self.x.dtype)

    def onehot(self, word_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        return self.x.detach()

    def extra_tensors(self, word_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"onehot": self.onehot()} if self.save_raw else {}


class OneHotFastInput(InputParam):
    """The same input space, optimized exactly in the hidden-size space.

    SGD on x moves e = x·W by -lr·(∇x L)·W = -lr·(∇e L)·(WᵀW): so the trainable tensor
    is e, and a gradient hook multiplies ∇e by G = WᵀW. Any optimizer whose step is a
    linear combination of past gradients (SGD, momentum, Nesterov; no weight decay)
    then follows the literal trajectory. x is recovered on demand:
    x = x0 + (e - e0)·G⁻¹·Wᵀ, since x - x0 stays in the row space of Wᵀ.
    """

    name = "onehot"

    def __init__(self, target_ids: Sequence[int], length: int, word_embeddings: torch.Tensor,
                 std: float, seed: int, save_raw: bool = False):
        super().__init__()
        W = word_embeddings.detach().float()
        e0 = initial_embeds(target_ids, length, W, std, seed)
        self.e = nn.Parameter(e0.clone())
        self.register_buffer("gram", (W.T @ W).contiguous(), persistent=False)
        self.init = dict(target_ids=list(target_ids), length=length, std=std, seed=seed)
        self.save_raw = save_raw
        self.e.register_hook(self.precondition)

    def set_rows(self, value: torch.Tensor) -> None:
        super().set_rows(value)
        self.e.register_hook(self.precondition)

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        with torch.autocast(grad.device.type, enabled=False):  # exact, in the gradient's dtype
            return grad @ self.gram.to(grad.dtype)

    def embeds(self, word_embeddings: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        return self.e[rows]

    @torch.no_grad()
    def onehot(self, word_embeddings: torch.Tensor) -> torch.Tensor:
        """x [targets, length, vocab], recovered exactly (float64 solve)."""
        W = word_embeddings.detach().double().cpu()
        i = self.init
        x0 = initial_onehot(i["target_ids"], i["length"], W.shape[0], i["std"], i["seed"]).double()
        delta = self.e.detach().double().cpu() - x0 @ W
        d = torch.linalg.solve(W.T @ W, delta.reshape(-1, W.shape[1]).T).T
        return (x0 + (d @ W.T).reshape(x0.shape)).float()

    def extra_tensors(self, word_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"onehot": self.onehot(word_embeddings)} if self.save_raw else {}


class EmbeddingInput(InputParam):
    """Optimize e directly in the word-embedding space (Poerner's "embfree")."""

    name = "embedding"

    def __init__(self, e0: torch.Tensor):
        super().__init__()
        self.e = nn.Parameter(e0.clone())

    def embeds(self, word_embeddings: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        return self.e[rows]


class SoftmaxInput(InputParam):
    """e = softmax(x)·W: a point in the convex hull of the word embeddings (Poerner)."""

    name = "softmax"
    probabilistic = True

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x = nn.Parameter(x0.clone())

    def probs(self, rows: slice = slice(None)) -> torch.Tensor:
        return F.softmax(self.x[rows].float(), dim=-1)

    def embeds(self, word_embeddings: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        return self.probs(rows).to(word_embeddings.dtype) @ word_embeddings

    def logits(self) -> torch.Tensor:
        return self.x.detach()


class GumbelInput(SoftmaxInput):
    """e = gumbel_softmax(x, tau)·W while training; noise-free softmax(x / tau) otherwise.

    `tau` is set each step by the control callback `ft.callbacks.TemperatureSchedule`
    (Poerner: geometric 2.0 -> 0.1). It is a buffer, so checkpoints resume it.
    """

    name = "gumbel"

    def __init__(self, x0: torch.Tensor, tau_start: float = 2.0, tau_end: float = 0.1,
                 anneal_steps: int | None = None):
        super().__init__(x0)
        if not 0 < tau_end <= tau_start:
            raise ConfigError(f"input.tau_start={tau_start}, tau_end={tau_end}; valid: 0 < end <= start")
        self.tau_start, self.tau_end, self.anneal_steps = tau_start, tau_end, anneal_steps
        self.register_buffer("tau", torch.tensor(float(tau_start)))

    def tau_at(self, step: int, total: int) -> float:
        """Geometric schedule: tau_start at step 0, tau_end at step total - 1 and after."""
        frac = min(1.0, step / max(1, total - 1))
        return self.tau_start * (self.tau_end / self.tau_start) ** frac

    def probs(self, rows: slice = slice(None)) -> torch.Tensor:
        x = self.x[rows].float()
        if self.training:
            return F.gumbel_softmax(x, tau=float(self.tau), hard=False, dim=-1)
        return F.softmax(x / self.tau, dim=-1)


class ProjectedInput(InputParam):
    """PEZ (Wen et al. 2023): a continuous e [T, l, E] whose forward pass uses its nearest
    vocabulary tokens (cosine, over the non-special tokens); the gradient at the projection
    updates e (straight-through: embeds = e + (W[nearest] - e).detach()). It starts at the
    embeddings of random tokens, seeded per target."""

    name = "projected"

    def __init__(self, e0: torch.Tensor, allowed: torch.Tensor):
        super().__init__()
        self.e = nn.Parameter(e0.clone())
        self.register_buffer("allowed", allowed.clone(), persistent=False)  # [V'] token ids

    def nearest(self, word_embeddings: torch.Tensor, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """[r, l] the token id nearest (cosine) to each row's continuous input."""
        with torch.no_grad():
            allowed = self.allowed.to(word_embeddings.device)
            words = F.normalize(word_embeddings[allowed].float(), dim=-1)  # [V', E]
            e = F.normalize(self.e[rows].detach().float(), dim=-1)  # [r, l, E]
            return allowed[(e @ words.T).argmax(-1)]

    def embeds(self, word_embeddings: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        e = self.e[rows]
        projected = word_embeddings[self.nearest(word_embeddings, rows)].to(e.dtype)
        return e + (projected - e).detach()

    def discrete_ids(self, word_embeddings: torch.Tensor) -> torch.Tensor:
        return self.nearest(word_embeddings)

    def extra_tensors(self, word_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"continuous": self.e.detach()}  # the continuous copy behind the projection


def build_projected(target_ids: Sequence[int], word_embeddings: torch.Tensor, allowed: torch.Tensor,
                    length: int = 1, seed: int = 0, **_: object) -> ProjectedInput:
    """input=projected: e0 = the embeddings of `length` random allowed tokens per target."""
    if not isinstance(length, int) or length < 1:
        raise ConfigError(f"input.length={length!r}; valid: an integer >= 1")
    out = []
    allowed = allowed.cpu()
    for tid in target_ids:
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(tid))
        out.append(allowed[torch.randint(len(allowed), (length,), generator=g)])
    ids = torch.stack(out)
    return ProjectedInput(word_embeddings.detach().float().cpu()[ids], allowed)


def is_linear_optimizer(make: Callable[..., torch.optim.Optimizer]) -> bool:
    """True for optimizers whose step is linear in past gradients: plain/momentum SGD."""
    func = make.func if isinstance(make, partial) else make
    kw = make.keywords if isinstance(make, partial) else {}
    return func is torch.optim.SGD and not kw.get("weight_decay")


def build_input(
    kind: str,
    target_ids: Sequence[int],
    word_embeddings: torch.Tensor,
    length: int = 1,
    init_std: float = 0.01,
    seed: int = 0,
    save_raw: bool = False,
    fast: bool | str = "auto",
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    tau_start: float = 2.0,
    tau_end: float = 0.1,
    anneal_steps: int | None = None,
) -> InputParam:
    """The parameterization named `kind`, initialized from the same x0 for every kind.

    For `onehot`, fast="auto" takes the exact hidden-space path when the optimizer allows
    it (`is_linear_optimizer`), fast=true insists on it, fast=false keeps the literal path.
    """
    if kind not in KINDS:
        raise ConfigError(f"input.kind={kind!r}; valid: {list(KINDS)}")
    if not isinstance(length, int) or length < 1:
        raise ConfigError(f"input.length={length!r}; valid: an integer >= 1")
    if kind == "embedding":
        return EmbeddingInput(initial_embeds(target_ids, length, word_embeddings, init_std, seed))
    if kind in ("softmax", "gumbel"):
        x0 = initial_onehot(target_ids, length, word_embeddings.shape[0], init_std, seed)
        if kind == "softmax":
            return SoftmaxInput(x0)
        return GumbelInput(x0, tau_start, tau_end, anneal_steps)
    linear = optimizer is not None and is_linear_optimizer(optimizer)
    if fast is True and not linear:
        raise ConfigError("input.fast=true needs optim=SGD without weight decay; use fast=auto")
    if fast is True or (fast == "auto" and linear):
        return OneHotFastInput(target_ids, length, word_embeddings, init_std, seed, save_raw)
    if fast not in (False, "auto"):
        raise ConfigError(f"input.fast={fast!r}; valid: auto, true, false")
    x0 = initial_onehot(target_ids, length, word_embeddings.shape[0], init_std, seed)
    return OneHotInput(x0, save_raw=save_raw)
