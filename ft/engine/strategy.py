"""Many devices: one process per device, each owning its own targets.

Stock DDP is wrong for ft: it broadcasts rank 0's parameters and averages gradients,
while every rank must optimize different rows of the input. This strategy keeps
Lightning's process launching and process group, and skips the DDP wrapper (so there is
no gradient all-reduce). The module takes its rows (`rank_rows`) in `setup` and gathers all
rows back at the end of fit (`TextualizationModule.gather_rows`).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from pytorch_lightning.strategies import DDPStrategy, Strategy

from ft.core.errors import ConfigError


class IndependentRowsStrategy(DDPStrategy):
    """DDP process model without DDP's parameter broadcast and gradient averaging."""

    strategy_name = "ft_independent"

    def configure_ddp(self) -> None:  # no DistributedDataParallel wrapper: rows are independent
        return None


def shard_rows(num_rows: int, shard: int, num_shards: int) -> slice:
    """Contiguous, deterministic block `shard` of `num_shards` (sizes differ by at most 1)."""
    base, extra = divmod(num_rows, num_shards)
    start = shard * base + min(shard, extra)
    return slice(start, start + base + (1 if shard < extra else 0))


def rank_rows(num_rows: int, rank: int, world: int) -> slice:
    """The rows rank `rank` of `world` optimizes: every world-th row from `rank`. Targets come
    sorted by layer, so interleaving gives every rank the same mix of layers (and work)."""
    return slice(rank, num_rows, world)


def interleave(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """Inverse of `rank_rows`: part r holds rows r, r + world, ... along `dim`."""
    world = len(parts)
    n = sum(p.shape[dim] for p in parts)
    out = parts[0].new_empty(*parts[0].shape[:dim], n, *parts[0].shape[dim + 1:])
    for r, p in enumerate(parts):
        out[(slice(None),) * dim + (slice(r, n, world),)] = p
    return out


def choose_strategy(trainer_cfg: DictConfig) -> str | Strategy:
    """Several devices: ft's strategy (each rank owns its rows), never stock DDP (DESIGN §5)."""
    devices, strategy = trainer_cfg.get("devices", 1), trainer_cfg.get("strategy", "auto")
    nodes = trainer_cfg.get("num_nodes", 1)
    many = (isinstance(devices, int) and devices > 1) or (
        not isinstance(devices, int | str) and len(devices) > 1) or (isinstance(nodes, int) and nodes > 1)
    if not many:
        return strategy
    if strategy not in ("auto", "ddp", IndependentRowsStrategy.strategy_name):
        raise ConfigError(f"trainer.strategy={strategy!r} with several devices or nodes; valid: auto, ddp "
                          "(both run ft's per-rank strategy; stock DDP would average the inputs)")
    backend = "gloo" if trainer_cfg.get("accelerator") == "cpu" else None
    return IndependentRowsStrategy(process_group_backend=backend)


def node_process_rank(trainer_cfg: DictConfig) -> int | None:
    """The global rank of a process started on node NODE_RANK of a multi-node job without a
    global RANK (as a hand-started node, or a launcher that sets only NODE_RANK and LOCAL_RANK):
    NODE_RANK x devices + LOCAL_RANK. None where the environment already names the global rank
    (RANK, Slurm's SLURM_PROCID), which Lightning reads itself."""
    import os

    if "RANK" in os.environ or "SLURM_PROCID" in os.environ or int(trainer_cfg.get("num_nodes", 1) or 1) < 2:
        return None
    devices = trainer_cfg.get("devices", 1)
    per_node = devices if isinstance(devices, int) else 1 if isinstance(devices, str) else len(devices)
    return int(os.environ.get("NODE_RANK", 0)) * per_node + int(os.environ.get("LOCAL_RANK", 0))
