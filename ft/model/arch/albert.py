"""ALBERT: one shared layer `encoder.albert_layer_groups[g].albert_layers[0]` applied L times
(layer L is the L-th application), 128-wide embeddings projected into the hidden size by
`encoder.embedding_hidden_mapping_in` (the analysis space is before it)."""

from __future__ import annotations

import torch
from torch import nn

from ft.model.arch.base import Adapter, UnsupportedModelError


class AlbertAdapter(Adapter):
    family = "albert"
    model_types = ("albert",)

    @classmethod
    def check_config(cls, config: object) -> None:
        if int(getattr(config, "inner_group_num", 1)) != 1:
            raise UnsupportedModelError(f"ALBERT with inner_group_num={config.inner_group_num}; "
                                        "valid: inner_group_num=1 (every released ALBERT)")

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def _group(self, layer: int) -> tuple[nn.Module, int, int]:
        """(the shared layer that runs as `layer`, its application index, applications per forward)."""
        L, groups = self.num_layers, int(self.config.num_hidden_groups)
        g = int(layer / (L / groups))
        uses = [i for i in range(L) if int(i / (L / groups)) == g]
        return self.model.encoder.albert_layer_groups[g].albert_layers[0], uses.index(layer), len(uses)

    def layers(self) -> nn.ModuleList:
        return nn.ModuleList(self._group(i)[0] for i in range(self.num_layers))

    def ffn_modules(self, layer: int) -> tuple[nn.Linear, object, nn.Linear]:
        block = self._group(layer)[0]
        return block.ffn, block.activation, block.ffn_output

    def final_norm(self, layer: int) -> nn.Module:
        return self._group(layer)[0].full_layer_layer_norm

    def attn_output(self, layer: int) -> nn.Linear:
        return self._group(layer)[0].attention.dense

    def occurrence(self, layer: int) -> tuple[int, int]:
        _, k, n = self._group(layer)
        return k, n

    def to_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.encoder.embedding_hidden_mapping_in(h)
