"""Objectives written as text: 'layer.3.ffn_out.5 - 0.5 * layer.2.ffn_act.7', heads, directions of a
file (layer.L.point@NAME), numbers, + - * / and parentheses, parsed into one Readout.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ft.core.errors import TargetError
from ft.model.sites import Site, SiteError, parse_head, parse_point, point_width
from ft.targets.objectives import Readout, direction, head_norm, neuron

# -- the expression syntax of target=terms ---------------------------------------------------------------
_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
                    r"|(?P<ref>layer\.\d+\.[a-z_]+(?:\.\d+|@[A-Za-z0-9_\-]+))|(?P<op>[-+*/()]))")


# What `ref@name` resolves to: (layer, point, name) -> the direction vector.
DirectionLookup = Callable[[int, str, str], torch.Tensor]


SYNTAX = ("sites 'layer.L.point.unit', heads 'layer.L.head.H', directions 'layer.L.point@ROW' or '@NAME' (rows of "
          "target.file), "
          "numbers, + - * / and parentheses, e.g. 'layer.3.ffn_out.5 - 0.5 * layer.2.ffn_act.7'")


def _tokens(spec: str) -> list[tuple[str, str]]:
    out, pos, text = [], 0, str(spec)
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise TargetError(f"target.specs: {spec!r}: cannot read {text[pos:].strip()[:20]!r}; valid: {SYNTAX}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    if not out:
        raise TargetError(f"target.specs: {spec!r} is empty; valid: {SYNTAX}")
    return out


def parse(spec: str, model: nn.Module | None, directions: DirectionLookup | None = None) -> Readout:
    """The Readout of an expression over sites and directions (linear: a product needs a number).

    Grammar: expr = term (('+' | '-') term)*; term = factor (('*' | '/') factor)*;
    factor = ('+' | '-') factor | number | site | direction | '(' expr ')'.
    A site is `layer.L.point.unit`; a direction is `layer.L.point@ROW` or `@NAME`, a row of the
    directions file (`directions(layer, point, name)` looks it up). Raises TargetError naming the
    spec and what is wrong. `model=None` checks the syntax only: sites are not checked against a
    model and directions are not looked up (whether their weights cancel waits for the model).
    """
    toks = _tokens(spec)
    at = [0]
    stand_ins: list[str] = []  # heads and directions read without a model: their weights are unknown

    def peek() -> tuple[str, str] | None:
        return toks[at[0]] if at[0] < len(toks) else None

    def take() -> tuple[str, str]:
        t = peek()
        if t is None:
            raise TargetError(f"target.specs: {spec!r} ends early; valid: {SYNTAX}")
        at[0] += 1
        return t

    def factor() -> Readout | float:
        token, text = take()
        if token == "op" and text in "+-":
            v = factor()
            return v if text == "+" else -1.0 * v
        if token == "num":
            return float(text)
        if token == "ref":
            return reference(text)
        if text == "(":
            v = expr()
            if peek() != ("op", ")"):
                raise TargetError(f"target.specs: {spec!r}: a '(' is not closed; valid: {SYNTAX}")
            take()
            return v
        raise TargetError(f"target.specs: {spec!r}: unexpected {text!r}; valid: {SYNTAX}")

    def term() -> Readout | float:
        v = factor()
        while peek() in (("op", "*"), ("op", "/")):
            _, op = take()
            w = factor()
            if op == "/":
                if not isinstance(w, float):
                    raise TargetError(f"target.specs: {spec!r}: division by a site is not linear; valid: / number")
                if w == 0:
                    raise TargetError(f"target.specs: {spec!r}: division by zero")
                v = v * (1.0 / w)
            elif isinstance(v, float) or isinstance(w, float):
                v = v * w if isinstance(w, float) else w * v
            else:
                raise TargetError(f"target.specs: {spec!r}: a product of two sites is not linear; "
                                  "valid: number * site")
        return v

    def expr() -> Readout | float:
        v = term()
        while peek() in (("op", "+"), ("op", "-")):
            _, op = take()
            w = term()
            if isinstance(v, float) != isinstance(w, float):
                raise TargetError(f"target.specs: {spec!r}: a constant term changes nothing to maximize; "
                                  "valid: numbers only as factors of sites")
            v = v + w if op == "+" else v + (-1.0) * w
        return v

    def reference(text: str) -> Readout:
        try:
            head = parse_head(text, model)
            if head is not None:
                if model is None:  # a stand-in: syntax only
                    stand_ins.append(text)
                    return Readout({Site(head[0], "attn_ctx", head[1]): 1.0}, [text])
                return head_norm(model, *head)
            if "@" not in text:
                site = Site.parse(text)
                return neuron(site if model is None else site.check(model))
            where, name = text.split("@")
            layer, point = parse_point(where, model)
            if directions is None:
                raise TargetError(f"target.specs: {spec!r} reads direction {text!r} but there is no directions "
                                  "file; valid: target.file=PATH (a safetensors file with a 'directions' tensor)")
            if model is None:  # a stand-in: syntax only
                stand_ins.append(text)
                return Readout({Site(layer, point, 0): 1.0}, [where])
            return direction(layer, point, directions(layer, point, name))
        except SiteError as e:
            raise TargetError(f"target.specs: {spec!r}: {e}") from None

    out = expr()
    if peek() is not None:
        raise TargetError(f"target.specs: {spec!r}: unexpected {peek()[1]!r}; valid: {SYNTAX}")
    if isinstance(out, float):
        raise TargetError(f"target.specs: {spec!r} reads no site; valid: {SYNTAX}")
    if not stand_ins and not out.norms and not any(w != 0 for w in out.weights.values()):
        raise TargetError(f"target.specs: {spec!r}: every weight cancels to 0; nothing to maximize")
    if not all(math.isfinite(w) for w in out.weights.values()):
        raise TargetError(f"target.specs: {spec!r}: a weight is not finite")
    return out


def reads_of(readouts: Iterable[Readout]) -> list[str]:
    """Every point a batch of readouts reads, in the contract's order."""
    return sorted({s.point for r in readouts for s in r.weights})


def check_width(model: nn.Module, point: str, width: int, what: str) -> None:
    w = point_width(model, point)
    if width != w:
        raise TargetError(f"{what}: vectors are {width} wide, {point} is {w} wide in this model; "
                          f"valid: directions [n, {w}] for {point}")
