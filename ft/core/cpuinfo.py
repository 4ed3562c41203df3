"""What this CPU can do for the engine: its model name and the vector and matrix features that
decide fp32 and bf16 speed (AVX2, AVX-512, AVX-512 bf16, AMX bf16)."""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

log = logging.getLogger("ft")
FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
BF16_UNITS = ("amx_bf16", "avx512_bf16")  # either makes bf16 matmuls faster than fp32 ones


def cpu_info(cpuinfo: str | None = None) -> dict[str, object]:
    """{"model": name, "features": the FEATURES the CPU has, "bf16_units": bool, "torch_capability"}
    from /proc/cpuinfo (or the text given)."""
    if cpuinfo is None:
        p = Path("/proc/cpuinfo")
        cpuinfo = p.read_text(errors="replace") if p.exists() else ""
    model, flags = platform.processor() or "unknown", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = set(value.split())
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError):
        capability = None
    have = [f for f in FEATURES if f in flags]
    return {"model": model, "features": have, "bf16_units": any(f in flags for f in BF16_UNITS),
            "torch_capability": capability}


def warn_cpu_precision(trainer_cfg: object, info: dict | None = None) -> str | None:
    """A bf16 precision on a CPU without bf16 matrix units runs slower than fp32 (26x on the AVX2
    VM, README): say so in the log, with what to use instead. Returns the message (None if fine)."""
    precision = str(trainer_cfg.get("precision", "32-true"))
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if not precision.startswith("bf16"):
        return None
    if accelerator != "cpu":
        import torch

        if accelerator != "auto" or torch.cuda.is_available():
            return None
    info = info or cpu_info()
    if info["bf16_units"]:
        return None
    message = (f"trainer.precision={precision} on a CPU without bf16 matrix units ({info['model']}; has "
               f"{', '.join(info['features']) or 'none'} of {', '.join(FEATURES)}): bf16 runs slower than fp32 "
               "here; trainer.precision=32-true is faster")
    log.warning(message)
    return message


def sync(device) -> None:
    """Wait for queued GPU work, so that wall-clock timings cover it."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def matmul_gflops(rows: int, H: int, inter: int, dtype, device,
                  repeat: int = 20) -> float:
    """Best rate of `F.linear` on [rows, H] by an [inter, H] weight: the layout of the engine's
    linear layers (on CPUs without bf16 units, a bf16 `a @ b` takes a path ~10x slower)."""
    import torch
    import torch.nn.functional as F

    a = torch.randn(rows, H, dtype=dtype, device=device)
    w = torch.randn(inter, H, dtype=dtype, device=device)
    for _ in range(3):
        F.linear(a, w)
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        for _ in range(5):
            F.linear(a, w)
        sync(device)
        best = min(best, (time.perf_counter() - t) / 5)
    return 2 * rows * H * inter / best / 1e9
