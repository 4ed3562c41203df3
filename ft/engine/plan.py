"""`python -m ft.bench --plan CONFIG_JSON [--targets N --steps S]`: what a full atlas of a model
costs, from its `config.json` alone (no weights).

The model is built on PyTorch's `meta` device (shapes, no memory), so the FLOPs are the engine's
own count (`FastSiteReader.step_flops` for families the lean forward serves, the hooked reader's
otherwise, plus the input preconditioner), for every FFN neuron (`ffn_act`, all layers) or the
first N of them, in the engine's target order. Memory per row is the engine's own estimate
(`ft.engine.module.rows_for_budget`). Wall time = steps x FLOPs per step / achieved rate:
- this CPU: the fp32 matmul rate measured now (`F.linear` at the engine's shapes) x the engine's
  share of it, 0.82 (the bert-base-shaped `ft.bench` on this machine; README);
- one GPU: 0.73 of an fp32 matmul rate of `--gpu-tflops` (default 48.3 TFLOP/s: what ft's H200
  bench implies, 72,351 neuron-steps/s on the bert-base atlas at 0.73 of the rate; README), and
  at least 15 ms per step (the Python-side floor a step showed there);
- N GPUs: the targets split over N ranks (`trainer.devices`/`num_nodes`, or shards), each as one.
Every assumption is printed with the numbers.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch

from ft.core.errors import ConfigError

CPU_EFFICIENCY = 0.82  # the engine's share of the fp32 matmul rate, bert-base-shaped, this VM (README)
GPU_EFFICIENCY = 0.73  # the same on one H200, the bert-base atlas (README)
MODELS_DIR = Path(str(files("ft.configs"))) / "plan"  # configs/ ships as ft.configs


@dataclass
class Plan:
    model: str
    family: str
    lean: bool
    layers: int
    hidden: int
    intermediate: int
    targets: int
    steps: int
    flops_per_neuron_step: float
    memory_per_row_mb: float
    cpu_gflops: float
    cpu_hours: float
    gpu_hours: float
    gpus: dict[int, float]  # N -> hours

    def lines(self) -> list[str]:
        fmt = lambda h: f"{h * 60:.1f} min" if h < 1 else f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} days"  # noqa: E731
        out = [f"{self.model}: {self.family}, {self.layers} layers, hidden {self.hidden}, FFN {self.intermediate} "
               f"({'lean forward' if self.lean else 'hooked forward'})",
               f"  targets {self.targets:,} (ffn_act neurons), steps {self.steps:,}, input length 1",
               f"  FLOPs per neuron-step {self.flops_per_neuron_step / 1e9:.3f} GFLOP; memory per row "
               f"{self.memory_per_row_mb:.2f} MB (activations kept for backward)",
               f"  this CPU ({self.cpu_gflops:.0f} GFLOP/s fp32 matmul x {CPU_EFFICIENCY}): {fmt(self.cpu_hours)}",
               f"  one GPU: {fmt(self.gpu_hours)}",
               "  " + ", ".join(f"{n} GPUs: {fmt(h)}" for n, h in self.gpus.items())]
        return out


def meta_model(config_json: str | Path) -> tuple[torch.nn.Module, str]:
    """The model of `config_json` on the meta device (no weights), and its name."""
    from transformers import AutoConfig, AutoModel

    path = Path(config_json)
    if not path.is_file():
        raise ConfigError(f"--plan {config_json}: no such file; valid: a model's config.json, e.g. one of "
                          f"{sorted(p.name for p in MODELS_DIR.glob('*.json'))} in {MODELS_DIR}")
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"a JSON {type(raw).__name__}, not an object")
        cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zero-element tensors of a degenerate config: refused below
            model = AutoModel.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - any value of the wrong type or range meets transformers' own checks
        cause = " ".join(str(e).split())[:160]
        raise ConfigError(f"--plan {config_json}: not a model config.json ({type(e).__name__}: {cause})") from None
    return model, raw.get("_name_or_path") or path.stem


def step_flops(model: torch.nn.Module, targets: int) -> tuple[float, bool]:
    """(FLOPs of one step over the first `targets` ffn_act neurons, lean?), as the engine counts."""
    from ft.model.arch import adapter
    from ft.model.fastforward import FastSiteReader, supports
    from ft.model.sites import Site, SiteIndex, hooked_step_flops

    a = adapter(model)
    L, inter, H = a.num_layers, a.point_width("ffn_act"), a.hidden_size
    per_layer = [targets // L + (1 if j < targets % L else 0) for j in range(L)]  # spread over the layers
    lean = supports(model)
    if lean:
        rows = [[Site(j, "ffn_act", u % inter)] for j, n in enumerate(per_layer) for u in range(n)]
        flops = FastSiteReader.step_flops(model, SiteIndex(model, rows), 1, 1)  # input length 1
    else:  # the hooked reader: chunks cut by layer, each runs every position up to its layer
        flops = sum(hooked_step_flops(model, n, j, 1) for j, n in enumerate(per_layer) if n)
    return flops + 2 * targets * 1 * H * H, lean  # + the input's gradient preconditioner


def plan(config_json: str | Path, targets: int | None = None, steps: int = 1000, gpus: tuple[int, ...] = (8, 64),
         gpu_tflops: float = 48.3, gpu_step_ms: float = 15.0, cpu_gflops: float | None = None) -> Plan:
    from ft.engine.module import rows_for_budget
    from ft.model.arch import adapter

    for k in gpus:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"--gpus {' '.join(map(str, gpus))}; valid: GPU counts, integers >= 1")
    for flag, v in (("--gpu-tflops", gpu_tflops), ("gpu_step_ms", gpu_step_ms)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{flag} {v}; valid: a finite number > 0")
    if cpu_gflops is not None and not (math.isfinite(cpu_gflops) and cpu_gflops > 0):
        raise ConfigError(f"cpu_gflops={cpu_gflops}; valid: a finite number > 0")
    model, name = meta_model(config_json)
    a = adapter(model)
    layers, width = a.num_layers, a.point_width("ffn_act")
    if layers < 1 or width < 1:
        raise ConfigError(f"--plan {config_json}: {layers} layers of {width} FFN neurons; valid: a model config with "
                          "num_hidden_layers >= 1 and an FFN width >= 1")
    total = layers * width
    n = total if targets is None else targets
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= total or steps < 1:
        raise ConfigError(f"--targets {targets}, --steps {steps}; valid: integers >= 1, targets at most the model's "
                          f"{total:,} ffn_act neurons")
    flops, lean = step_flops(model, n)
    if cpu_gflops is None:
        from ft.core.cpuinfo import matmul_gflops

        cpu_gflops = matmul_gflops(1024, a.hidden_size, a.intermediate_size, torch.float32, torch.device("cpu"))
    per_row_mb = 1024 / rows_for_budget(model, 1, 2048)  # the engine's estimate: rows in half of 2 GiB
    cpu_s = steps * flops / (cpu_gflops * 1e9 * CPU_EFFICIENCY)

    def gpu_hours(k: int) -> float:
        share = flops * math.ceil(n / k) / n  # the busiest rank's rows
        return steps * max(share / (gpu_tflops * 1e12 * GPU_EFFICIENCY), gpu_step_ms / 1e3) / 3600

    return Plan(name, a.family, lean, a.num_layers, a.hidden_size, a.intermediate_size, n, steps, flops / n,
                per_row_mb, cpu_gflops, cpu_s / 3600, gpu_hours(1), {k: gpu_hours(k) for k in gpus})


def assumptions(gpu_tflops: float, gpu_step_ms: float) -> list[str]:
    return ["assumptions:",
            f"  CPU: the engine runs at {CPU_EFFICIENCY} of this CPU's fp32 matmul rate (measured now), as the "
            "bert-base-shaped ft.bench did on the 2-core VM",
            f"  GPU: {GPU_EFFICIENCY} of {gpu_tflops:g} TFLOP/s fp32 (ft's H200 bench, bert-base atlas), and no step "
            f"faster than {gpu_step_ms:g} ms (its Python-side floor)",
            "  every target runs every step (no early stop: converged rows drop out sooner in practice); "
            "input length 1; fp32; N GPUs split the targets evenly (ranks or shards)"]
