"""BERT (MiniLM), RoBERTa / XLM-R / CamemBERT and ELECTRA: BERT's layer layout,
`encoder.layer[L].{attention, intermediate, output}`."""

from __future__ import annotations

import torch
from torch import nn

from ft.model.arch.base import Adapter, LeanParts


class BertAdapter(Adapter):
    family = "bert"
    model_types = ("bert",)
    lean = True

    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layer

    def ffn_modules(self, layer: int) -> tuple[nn.Linear, object, nn.Linear]:
        block = self.layers()[layer]
        return block.intermediate.dense, block.intermediate.intermediate_act_fn, block.output.dense

    def final_norm(self, layer: int) -> nn.Module:
        return self.layers()[layer].output.LayerNorm

    def attn_output(self, layer: int) -> nn.Linear:
        return self.layers()[layer].attention.output.dense

    def lean_parts(self, layer: int) -> LeanParts:
        block = self.layers()[layer]
        s = block.attention.self
        return LeanParts(heads=int(self.config.num_attention_heads), query=s.query, key=s.key, value=s.value,
                         attn_out=block.attention.output.dense, ln1=block.attention.output.LayerNorm,
                         inter=block.intermediate.dense, act=block.intermediate.intermediate_act_fn,
                         out=block.output.dense, ln2=block.output.LayerNorm)


class RobertaAdapter(BertAdapter):
    """RoBERTa-style position ids (counted from padding_idx + 1) come from the embeddings module."""

    family = "roberta"
    model_types = ("roberta", "xlm-roberta", "camembert")

    @staticmethod
    def max_tokens(config: object) -> int | None:
        n = Adapter.max_tokens(config)
        pad = int(getattr(config, "pad_token_id", 1) or 1)
        return None if n is None else n - pad - 1


class ElectraAdapter(BertAdapter):
    """ELECTRA: BERT's layers; embeddings may be smaller than the hidden size, with a projection
    (`embeddings_project`) after the embeddings module. The analysis space is before it."""

    family = "electra"
    model_types = ("electra",)

    def to_hidden(self, h: torch.Tensor) -> torch.Tensor:
        proj = getattr(self.model, "embeddings_project", None)
        return proj(h) if proj is not None else h
