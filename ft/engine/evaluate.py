"""A fresh float32 forward of whole framed inputs (`[CLS] ... [SEP]`) through the targets'
objectives: the numbers a run reports, independent of the training step's precision and path."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ft.engine.module import use_fast_forward
from ft.model.arch import adapter
from ft.targets.objectives import Reading, Readout, batch_of


@torch.no_grad()
def measure(model: torch.nn.Module, objectives: Sequence[Readout], seq: torch.Tensor, position: int,
            chunk: int = 256) -> torch.Tensor:
    """[rows] each row's objective for `[CLS] ... [SEP]` inputs in float32: `seq` is either
    `inputs_embeds` [rows, S, E], or token ids [rows, S] read through the model's own lookup."""
    device = adapter(model).word_embeddings.device
    ids = not seq.is_floating_point()
    out = []
    for start in range(0, len(seq), chunk):
        part = seq[start : start + chunk].to(device)
        with torch.autocast(device_type=device.type, enabled=False):
            batch = batch_of(model, objectives[start : start + chunk])
            reading = (Reading(model, None, None, position, False, input_ids=part) if ids else
                       Reading(model, part[:, 1:-1].float(), part.float(), position, use_fast_forward(model)))
            out.append(batch.value(reading).float().cpu())
    return torch.cat(out)
