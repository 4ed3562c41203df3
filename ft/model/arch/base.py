"""The adapter interface: layers, points, embeddings and FFN weights of one model family."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ft.core.errors import ModelNotFoundError

# in the order a layer computes them
POINTS: tuple[str, ...] = ("attn_ctx", "attn_out", "ffn_act", "ffn_out", "resid")
ATTENTION_POINTS = ("attn_ctx", "attn_out")


class UnsupportedModelError(ModelNotFoundError):
    """The model's family has no adapter (decoder-only, encoder-decoder, or not yet supported)."""


@dataclass(frozen=True)
class LeanParts:
    """A layer's modules in BERT's layout, for the lean forward (ft.model.fastforward)."""

    heads: int
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attn_out: nn.Linear
    ln1: nn.Module
    inter: nn.Linear
    act: object
    out: nn.Linear
    ln2: nn.Module


class Adapter:
    """What ft needs of a loaded Hugging Face encoder of one family.

    Subclasses set `family`, `model_types`, and implement `layers`, `ffn_modules` (the FFN's
    input projection, activation, output projection), `attn_output` (the attention's output
    projection: its input is the heads' concatenated context vectors), `final_norm` (the module
    whose output is the hidden state a layer hands on) and, where the lean forward reproduces
    the layer, `lean_parts`.
    """

    family: str = ""
    model_types: tuple[str, ...] = ()
    lean: bool = False  # ft.model.fastforward reproduces this family's layers exactly
    gated: bool = False  # the FFN's input projection gives input and gate (GeGLU): [2 * inter, hidden]

    def __init__(self, model: nn.Module):
        self.check_config(model.config)
        self.model = model
        self.config = model.config

    @classmethod
    def check_config(cls, config: object) -> None:
        """Raise UnsupportedModelError for a config of this family that the adapter cannot serve."""

    # -- shape -------------------------------------------------------------------------------------
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def intermediate_size(self) -> int:
        return int(self.config.intermediate_size)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def embedding_size(self) -> int:
        """Width of the word embeddings (the input space); the hidden size unless factorized."""
        return int(self.word_embeddings.shape[1])

    def point_width(self, point: str) -> int:
        return self.intermediate_size if point == "ffn_act" else self.hidden_size

    @property
    def head_size(self) -> int:
        """Width of one head's context vector: head h owns `attn_ctx` units h*d .. (h+1)*d - 1."""
        return self.point_width("attn_ctx") // self.num_heads

    # -- modules -----------------------------------------------------------------------------------
    def ffn_modules(self, layer: int) -> tuple[nn.Linear, object, nn.Linear]:
        raise NotImplementedError

    def final_norm(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def attn_output(self, layer: int) -> nn.Linear:
        raise NotImplementedError

    def point_hook(self, layer: int, point: str) -> tuple[nn.Module, str]:
        """(module, "pre" | "post"): the point is the module's input (pre) or output (post)."""
        if point in ATTENTION_POINTS:  # the output projection's input (the heads' context) and output
            return self.attn_output(layer), "pre" if point == "attn_ctx" else "post"
        _, _, out = self.ffn_modules(layer)
        if point == "ffn_act":
            return out, "pre"
        if point == "ffn_out":
            return out, "post"
        if point == "resid":
            return self.final_norm(layer), "post"
        raise ValueError(f"unknown point {point!r}; valid: {list(POINTS)}")

    def occurrence(self, layer: int) -> tuple[int, int]:
        """(k, n): the point's module runs n times per forward and `layer` is its k-th run (a
        shared layer, as in ALBERT); (0, 1) for a module of its own."""
        return 0, 1

    def ffn_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(W_in [inter, hidden], b_in, W_out [hidden, inter], b_out) of the layer's FFN."""
        w_in, _, w_out = self.ffn_modules(layer)
        return w_in.weight, w_in.bias, w_out.weight, w_out.bias

    def lean_parts(self, layer: int) -> LeanParts:
        raise NotImplementedError(f"{self.family} has no lean forward")

    # -- embeddings --------------------------------------------------------------------------------
    @property
    def embeddings(self) -> nn.Module:
        return self.model.embeddings

    @property
    def word_embeddings(self) -> torch.Tensor:
        """W_word [vocab, embedding size]: the one-hot input space into the input space."""
        return self.model.get_input_embeddings().weight

    def embed(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The embeddings module's output: the analysis space ([batch, seq, embedding size])."""
        if inputs_embeds is not None:
            return self.embeddings(inputs_embeds=inputs_embeds)
        return self.embeddings(input_ids=input_ids)

    def to_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The analysis space into the hidden size (a projection for factorized embeddings)."""
        return h

    @staticmethod
    def max_tokens(config: object) -> int | None:
        """Longest sequence (special tokens included) the position embeddings allow."""
        n = getattr(config, "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    @staticmethod
    def embedding_size_of(config: object) -> int:
        return int(getattr(config, "embedding_size", None) or config.hidden_size)
