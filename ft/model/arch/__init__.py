"""Architecture adapters: everything ft needs to know about a model family, in one place.

`adapter(model)` returns the adapter of a loaded Hugging Face encoder; `family_of(config)` names
the family from its config alone (the checks before a run use it). Nothing outside this package
names an architecture or a module path. Every family defines the three points the same way:

- `ffn_act`: the FFN's hidden activation, the input of its output projection;
- `ffn_out`: the output of the FFN's output projection, before the residual add and LayerNorm;
- `resid`: the hidden state the layer hands on (the output of its last LayerNorm).
"""

from __future__ import annotations

from ft.model.arch.albert import AlbertAdapter
from ft.model.arch.base import Adapter, UnsupportedModelError
from ft.model.arch.bert import BertAdapter, ElectraAdapter, RobertaAdapter
from ft.model.arch.deberta import DebertaAdapter
from ft.model.arch.distilbert import DistilBertAdapter
from ft.model.arch.modernbert import ModernBertAdapter

ADAPTERS: tuple[type[Adapter], ...] = (BertAdapter, RobertaAdapter, ElectraAdapter, DistilBertAdapter, DebertaAdapter,
                                       ModernBertAdapter, AlbertAdapter)
SUPPORTED = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_class(config: object) -> type[Adapter]:
    """The adapter class for a model config; UnsupportedModelError naming the supported families."""
    model_type = str(getattr(config, "model_type", "") or "")
    for a in ADAPTERS:
        if model_type in a.model_types:
            a.check_config(config)
            return a
    kind = ("a decoder-only model" if getattr(config, "is_decoder", False) or model_type in DECODERS
            else "an encoder-decoder model" if getattr(config, "is_encoder_decoder", False) else "not supported yet")
    raise UnsupportedModelError(f"model_type {model_type!r} ({type(config).__name__}) is {kind}; "
                                f"valid: an encoder of the families {', '.join(SUPPORTED)}")


DECODERS = ("gpt2", "gpt_neo", "gptj", "llama", "mistral", "opt", "bloom", "falcon", "qwen2", "phi", "gemma")


def family_of(config: object) -> str:
    return adapter_class(config).family


def adapter(model: object) -> Adapter:
    """The (cached) adapter of a loaded model."""
    a = getattr(model, "_ft_adapter", None)
    if a is None or a.model is not model:
        a = adapter_class(model.config)(model)
        model._ft_adapter = a
    return a


__all__ = ["ADAPTERS", "SUPPORTED", "Adapter", "UnsupportedModelError", "adapter", "adapter_class", "family_of"]
