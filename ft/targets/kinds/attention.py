"""`target=attention`: attention weights, the post-softmax weight of head H in layer L from query position I
to key position J, `layer.L.attn.H.I.J`.

The value is the entry `[row, H, I, J]` of Hugging Face's `output_attentions[L]` for the same
input. Positions count in the framed sequence `[CLS] x [SEP]` ([CLS] at 0, [SEP] at S - 1).

How the probabilities are obtained: the model runs once, in eager attention for that call (the
model's `config._attn_implementation` is set to "eager" and restored afterwards: SDPA and flash
kernels return no probabilities). A forward hook on each of the family's self-attention modules
(the class Hugging Face itself records `attentions` from, `_can_record_outputs["attentions"]`)
takes the probabilities in call order -- the order of `output_attentions`, a shared ALBERT layer
once per application -- and stops the forward after the highest layer a row needs. A family
whose model class declares no such module (DeBERTa-v2, the older layout) runs the whole forward
with `output_attentions=True` instead. A family that returns no probabilities is refused with a
TargetError rather than read wrong.

Like `ClassLogit`, an attention weight is not a weighted sum of site activations: it has no sites
and no lean path, and its batch class (`AttentionWeights`) computes one value per row in one
forward, differentiable with respect to the input (`reading.seq`).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Annotated, Any

import torch
from torch import nn

from ft.core.errors import ConfigError, TargetError
from ft.core.typed import Unique
from ft.model.arch import UnsupportedModelError, adapter
from ft.targets.base import Target
from ft.targets.objectives import Objective, Reading
from ft.targets.registry import BuildContext, RebuildContext, UnitKind, register

_ATTN_RE = re.compile(r"^layer\.(\d+)\.attn\.(\d+)\.(\d+)\.(\d+)$")
SYNTAX = "'layer.L.attn.H.I.J' (head H of layer L, query position I to key position J; [CLS] at 0)"


def _as_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise TargetError(f"attention target: {what} {value!r} is not an integer; valid: an integer")
    try:
        return operator.index(value)
    except TypeError:
        raise TargetError(f"attention target: {what} {value!r} is not an integer; valid: an integer") from None


class AttentionWeight(Objective):
    """The attention weight of head `head` in layer `layer` from query position `query` to key
    position `key` (framed positions, [CLS] at 0): `output_attentions[layer][row, head, query, key]`."""

    def __init__(self, model: nn.Module, layer: int, head: int, query: int, key: int):
        layer, head = _as_int(layer, "layer"), _as_int(head, "head")
        query, key = _as_int(query, "query position"), _as_int(key, "key position")
        spec = f"layer.{layer}.attn.{head}.{query}.{key}"
        try:
            arch = adapter(model)
        except UnsupportedModelError as e:
            raise TargetError(f"attention target {spec!r}: {e}") from None
        n, heads = arch.num_layers, arch.num_heads
        if not 0 <= layer < n:
            raise TargetError(f"attention target {spec!r}: layer {layer} out of range; valid 0..{n - 1}")
        if not 0 <= head < heads:
            raise TargetError(f"attention target {spec!r}: head {head} out of range; valid 0..{heads - 1}")
        longest = arch.max_tokens(model.config)
        for what, p in (("query position", query), ("key position", key)):
            if p < 0 or (longest is not None and p >= longest):
                top = f"0..{longest - 1}" if longest is not None else ">= 0"
                raise TargetError(f"attention target {spec!r}: {what} {p} out of range; valid {top} "
                                  "(framed positions, [CLS] at 0)")
        self.model = model
        self.layer, self.head, self.query, self.key = layer, head, query, key
        self.spec = spec
        self.reads = (spec,)
        self.sites: list = []
        self.layers = [layer]

    def __repr__(self) -> str:
        return f"AttentionWeight({self.spec})"

    def value(self, reading: Reading) -> torch.Tensor:
        return AttentionWeights([self] * reading.rows).value(reading)


def parse_attention(text: str, model: nn.Module) -> AttentionWeight | None:
    """The AttentionWeight of `layer.L.attn.H.I.J`, None for text of any other form; TargetError
    for a well-formed string whose numbers the model does not have."""
    m = _ATTN_RE.match(str(text).strip())
    if not m:
        return None
    return AttentionWeight(model, *(int(g) for g in m.groups()))


class _StopForward(Exception):
    """Raised by the hook once the highest needed layer's probabilities are in."""


@contextmanager
def eager_attention(model: nn.Module):
    """Run `model` in eager attention (which returns the probabilities); the previous setting back after."""
    config = model.config
    before = getattr(config, "_attn_implementation", None)
    changed = before not in (None, "eager") and hasattr(config, "_attn_implementation_internal")
    if changed:
        config._attn_implementation = "eager"
    try:
        yield
    finally:
        if changed:
            config._attn_implementation = before


def attention_module_class(model: nn.Module) -> tuple[type | str | None, int]:
    """(the class whose forward output holds the attention probabilities, their index in its output
    tuple), as the model class declares it for `output_attentions`; (None, 1) when it declares none."""
    spec = (getattr(type(model), "_can_record_outputs", None) or {}).get("attentions")
    if isinstance(spec, list | tuple):
        spec = spec[0] if len(spec) == 1 else None
    if spec is None:
        return None, 1
    if isinstance(spec, type | str):
        return spec, 1
    target = getattr(spec, "target_class", None) or getattr(spec, "class_name", None)
    if getattr(spec, "layer_name", None) is not None:  # a recorder restricted to some modules: not handled here
        return None, 1
    return target, int(getattr(spec, "index", 1))


def _matches(name: str, module: nn.Module, target: type | str) -> bool:
    return isinstance(module, target) if isinstance(target, type) else name.endswith(target)


class AttentionWeights(Objective):
    """A batch of attention weights, one `AttentionWeight` per row (rows may differ in layer, head
    and positions): one forward of the encoder, up to the highest layer read."""

    def __init__(self, rows: Sequence[AttentionWeight]):
        self.rows = list(rows)
        if not self.rows:
            raise TargetError("attention targets: no rows; valid: one AttentionWeight per row")
        bad = [r for r in self.rows if not isinstance(r, AttentionWeight)]
        if bad:
            raise TargetError(f"attention targets: {bad[0]!r} is not an attention weight; valid: one target kind "
                              "per run")
        self.model = self.rows[0].model
        self.layer = torch.tensor([r.layer for r in self.rows])
        self.head = torch.tensor([r.head for r in self.rows])
        self.query = torch.tensor([r.query for r in self.rows])
        self.key = torch.tensor([r.key for r in self.rows])
        self.max_layer = int(self.layer.max())

    def __len__(self) -> int:
        return len(self.rows)

    def _check_positions(self, length: int) -> None:
        for r in self.rows:
            for what, p in (("query position", r.query), ("key position", r.key)):
                if p >= length:
                    raise TargetError(f"attention target {r.spec!r}: {what} {p} is beyond the sequence of {length} "
                                      f"tokens; valid 0..{length - 1} (framed positions, [CLS] at 0)")

    def probabilities(self, model: nn.Module, given: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """[n, heads, S, S] attention probabilities of layers 0..max_layer, in `output_attentions` order."""
        family = type(model).__name__
        target, index = attention_module_class(model)
        need = self.max_layer + 1
        found: list[torch.Tensor | None] = []
        if target is not None:
            modules = [m for name, m in model.named_modules() if _matches(name, m, target)]
            if not modules:
                raise TargetError(f"attention targets: {family} has no {getattr(target, '__name__', target)} module "
                                  "to read attention probabilities from; valid: bert, roberta, xlm-roberta, camembert, "
                                  "electra, distilbert, albert, deberta-v2, modernbert")

            def hook(_m, _args, out):
                found.append(out[index] if isinstance(out, tuple) and len(out) > index else None)
                if len(found) >= need:
                    raise _StopForward

            handles = [m.register_forward_hook(hook) for m in modules]
            try:
                with eager_attention(model):
                    model(**given)
            except _StopForward:
                pass
            finally:
                for h in handles:
                    h.remove()
        else:
            with eager_attention(model):
                out = model(**given, output_attentions=True)
            found = list(getattr(out, "attentions", None) or ())
        probs = found[:need]
        if len(probs) < need or any(p is None or p.dim() != 4 for p in probs):
            raise TargetError(f"attention targets: {family} returned no attention probabilities for layers "
                              f"0..{self.max_layer} (got {sum(p is not None for p in probs)}); valid: a family whose "
                              "eager attention returns them (bert, roberta, electra, distilbert, albert, deberta-v2, "
                              "modernbert)")
        return probs

    def value(self, reading: Reading) -> torch.Tensor:
        if reading.input_ids is not None:
            given, length = {"input_ids": reading.input_ids}, int(reading.input_ids.shape[1])
        else:
            given, length = {"inputs_embeds": reading.seq}, int(reading.seq.shape[1])
        if reading.rows != len(self.rows):
            raise TargetError(f"attention targets: {len(self.rows)} objectives for a reading of {reading.rows} rows; "
                              "valid: one per row")
        self._check_positions(length)
        model = reading.model
        probs = self.probabilities(model, given)
        heads = probs[0].shape[1]
        if int(self.head.max()) >= heads or probs[0].shape[-1] != length or probs[0].shape[-2] != length:
            raise TargetError(f"attention targets: {type(model).__name__} returned attention of shape "
                              f"{tuple(probs[0].shape)} for {length} tokens; valid: [rows, heads, {length}, {length}]")
        layers = sorted(set(self.layer.tolist()))
        at = {layer: i for i, layer in enumerate(layers)}
        stacked = torch.stack([probs[layer] for layer in layers])  # [k, n, heads, S, S]
        device = stacked.device
        which = torch.tensor([at[int(v)] for v in self.layer], device=device)
        rows = torch.arange(len(self.rows), device=device)
        return stacked[which, rows, self.head.to(device), self.query.to(device), self.key.to(device)]


AttentionWeight.batch_class = AttentionWeights  # a chunk of attention weights: one forward


@register
class AttentionKind(UnitKind):
    """`target=attention target.sites=[layer.L.attn.H.I.J]`: the post-softmax attention weight of
    head H in layer L from query position I to key position J of the framed input (`[CLS]` at 0),
    equal to Hugging Face's `output_attentions[L][:, H, I, J]`."""

    name = "attention"
    option = "attention"
    summary_line = "attention weights layer.L.attn.H.I.J: head H of layer L, query I to key J ([CLS] is 0)"
    keys = {"sites": Annotated[list[str], Unique] | None}
    word_stats = "forward"  # no sites to sweep: every word goes through the objective
    token_examples = False  # positions of the framed input, not a token of a sentence

    def check(self, t: dict) -> None:
        if not t.get("sites"):
            raise ConfigError("target.sites is empty; valid: a list of layer.L.attn.H.I.J, e.g. [layer.1.attn.0.1.2]")
        for text in t["sites"]:
            if not _ATTN_RE.match(str(text)):
                raise ConfigError(f"target.sites: {text!r} is not an attention weight; valid: layer.L.attn.H.I.J")

    def check_model(self, t: dict, model: torch.nn.Module) -> None:
        for text in t.get("sites") or []:
            parse_attention(text, model)

    def build(self, ctx: BuildContext) -> list[Target]:
        model = ctx.encoder.model
        return [Target("attention", parse_attention(str(s), model), spec=str(s)) for s in ctx.cfg.target.sites]

    def rebuild(self, row: Any, ctx: RebuildContext) -> Objective:
        return parse_attention(str(row.spec), ctx.model)
