"""ModernBERT: pre-norm layers `layers[L].{attn_norm, attn, mlp_norm, mlp.{Wi, act, Wo}}`, a GeGLU
FFN (Wi gives input and gate; `ffn_act` = act(input) * gate, the input of Wo), RoPE, and a
`final_norm` after the last layer that belongs to no layer's `resid`."""

from __future__ import annotations

import torch
from torch import nn

from ft.model.arch.base import Adapter


class ModernBertAdapter(Adapter):
    family = "modernbert"
    model_types = ("modernbert",)
    gated = True

    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def ffn_modules(self, layer: int) -> tuple[nn.Linear, object, nn.Linear]:
        mlp = self.layers()[layer].mlp
        return mlp.Wi, mlp.act, mlp.Wo

    def attn_output(self, layer: int) -> nn.Linear:
        return self.layers()[layer].attn.Wo

    def point_hook(self, layer: int, point: str) -> tuple[nn.Module, str]:
        if point == "resid":  # pre-norm: the layer's own output is what it hands on
            return self.layers()[layer], "post"
        return super().point_hook(layer, point)

    def ffn_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """W_in is Wi [2 * inter, hidden]: its first half gives the input, its second the gate."""
        return super().ffn_weights(layer)

    @staticmethod
    def max_tokens(config: object) -> int | None:
        return None  # rotary positions: no table to outgrow at ft's lengths
