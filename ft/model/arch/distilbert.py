"""DistilBERT: `transformer.layer[L].{attention, sa_layer_norm, ffn.{lin1, lin2}, output_layer_norm}`."""

from __future__ import annotations

import torch
from torch import nn

from ft.model.arch.base import Adapter


class DistilBertAdapter(Adapter):
    family = "distilbert"
    model_types = ("distilbert",)

    def layers(self) -> nn.ModuleList:
        return self.model.transformer.layer

    @property
    def hidden_size(self) -> int:
        return int(self.config.dim)

    @property
    def intermediate_size(self) -> int:
        return int(self.config.hidden_dim)

    @property
    def num_heads(self) -> int:
        return int(self.config.n_heads)

    def ffn_modules(self, layer: int) -> tuple[nn.Linear, object, nn.Linear]:
        ffn = self.layers()[layer].ffn
        return ffn.lin1, ffn.activation, ffn.lin2

    def final_norm(self, layer: int) -> nn.Module:
        return self.layers()[layer].output_layer_norm

    def attn_output(self, layer: int) -> nn.Linear:
        return self.layers()[layer].attention.out_lin

    def embed(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.embeddings(input_ids, inputs_embeds) if inputs_embeds is not None else self.embeddings(input_ids)

    @staticmethod
    def embedding_size_of(config: object) -> int:
        return int(config.dim)
