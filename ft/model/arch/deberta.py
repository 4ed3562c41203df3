"""DeBERTa-v2/v3: BERT's FFN layout (`encoder.layer[L].{intermediate, output}`) with relative
attention; any projection of the embeddings happens inside the embeddings module."""

from __future__ import annotations

from ft.model.arch.bert import BertAdapter


class DebertaAdapter(BertAdapter):
    family = "deberta-v2"
    model_types = ("deberta-v2",)
    lean = False  # relative (disentangled) attention: the hooked path

    @staticmethod
    def max_tokens(config: object) -> int | None:
        if getattr(config, "position_biased_input", False):
            return BertAdapter.max_tokens(config)
        return None  # relative positions only: no absolute position table to outgrow
