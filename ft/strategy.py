"""Many devices: one process per device, each owning its own targets.

Stock DDP is wrong for ft: it broadcasts rank 0's parameters and averages gradients,
while every rank must optimize different rows of the input. This strategy keeps
Lightning's process launching and process group, and skips the DDP wrapper (so there is
no gradient all-reduce). The module takes its shard of rows in `setup` and gathers all
rows back at the end of fit (`TextualizationModule.gather_rows`).
"""

from __future__ import annotations

from pytorch_lightning.strategies import DDPStrategy


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
