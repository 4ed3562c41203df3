"""Objectives: what a row maximizes, as objects that add, subtract and scale (Lucent's algebra).

An objective reads one chunk of rows (a `Reading`: the input and, on demand, the activations at
the read position) and returns one value per row. Two families:

- **Readouts** are linear in site activations: a neuron (one site), a group mean (1/k on each
  of k sites), a direction (h . v over every unit of one point), and any sum or multiple of them.
  A `Readout` is one row's weights over sites; `Readouts` is a batch of them, one per row,
  compiled once into a `SiteIndex` so every reader (hooked or lean) evaluates it in one pass.
- **Input objectives** read the input itself: `InputNorm` (sum of squared norms of the raw
  input) and `WordDistance` (sum over tokens of 1 - the cosine to the nearest word in the
  analysis space). The regularizers are these with a negative coefficient.

`Sum` holds any mix; the module evaluates `objective + regularizers` without knowing the kinds.
`ft.targets.expressions.parse(spec)` reads the expression syntax of `target=terms`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ft.core.errors import TargetError
from ft.model.sites import Site, SiteIndex, SiteReader, head_sites


@dataclass
class Reading:
    """One chunk of rows as the objectives see it. `seq`: `[CLS] embeds [SEP]` [n, l + 2, E];
    `embeds` [n, l, E] the optimized part. Site values are read once per index (`site_values`)."""

    model: nn.Module
    embeds: torch.Tensor | None
    seq: torch.Tensor | None
    position: int
    fast: bool
    input_ids: torch.Tensor | None = None  # [n, l + 2] token ids instead of `seq` (the model's own lookup)
    cache: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.input_ids) if self.input_ids is not None else self.seq.shape[0]

    def site_values(self, index: SiteIndex) -> torch.Tensor:
        """[n, k]: the activation at each of `index`'s sites (0 in padding slots)."""
        key = id(index)
        if key not in self.cache:
            if self.input_ids is not None:
                reader = SiteReader(self.model, index.points, index.max_layer, self.position)
                acts = reader.read(input_ids=self.input_ids)
                values = index.flatten(acts).gather(1, index.index.to(self.input_ids.device))
            elif self.fast:
                from ft.model.fastforward import FastSiteReader

                reader = FastSiteReader(self.model, index.points, index.max_layer, self.position)
                values = reader.read_sites(self.seq, index, const_ends=True)
            else:
                acts = SiteReader(self.model, index.points, index.max_layer, self.position).read(inputs_embeds=self.seq)
                values = index.flatten(acts).gather(1, index.index.to(self.seq.device))
            self.cache[key] = values
        return self.cache[key]


class Objective:
    """One value per row of a `Reading`. Add, subtract, negate, multiply or divide by a number."""

    def value(self, reading: Reading) -> torch.Tensor:  # [n]
        raise NotImplementedError

    def __call__(self, reading: Reading) -> torch.Tensor:
        return self.value(reading)

    def terms(self) -> list[tuple[float, Objective]]:
        return [(1.0, self)]

    def __add__(self, other: Objective | float) -> Objective:
        if isinstance(other, int | float):
            return self if other == 0 else NotImplemented
        return Sum([*self.terms(), *other.terms()])

    def __radd__(self, other: object) -> Objective:
        return self if other == 0 else NotImplemented  # sum([...]) starts at 0

    def __sub__(self, other: Objective) -> Objective:
        return self + (-1.0) * other

    def __neg__(self) -> Objective:
        return (-1.0) * self

    def __mul__(self, c: float) -> Objective:
        if not isinstance(c, int | float):
            return NotImplemented
        return Sum([(c * w, o) for w, o in self.terms()])

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> Objective:
        return self * (1.0 / c)


class Sum(Objective):
    """sum_i w_i * o_i(reading)."""

    def __init__(self, parts: Sequence[tuple[float, Objective]]):
        self.parts = [(float(w), o) for w, o in parts if w != 0]

    def terms(self) -> list[tuple[float, Objective]]:
        return list(self.parts)

    def value(self, reading: Reading) -> torch.Tensor:
        out = None
        for w, o in self.parts:
            v = o.value(reading)
            v = v if w == 1.0 else w * v
            out = v if out is None else out + v
        return out if out is not None else torch.zeros(reading.rows)


class Readout(Objective):
    """One row's objective over site activations, closed under + - * /:

        sum_s w_s * act(s)  +  bias  +  sum_j c_j * || act(sites_j) ||_2

    The linear part is a neuron, a group mean, a direction, an SAE latent's pre-activation (with
    its bias); the norms are attention heads (the L2 norm of a head's context vector).
    `reads`: the names of what it reads, as the contract's `sites` column lists them (a unit
    `layer.3.ffn_out.5`, a whole point `layer.3.resid` for a direction, a head `layer.2.head.4`).
    """

    def __init__(self, weights: dict[Site, float], reads: Sequence[str], bias: float = 0.0,
                 norms: Sequence[tuple[float, tuple[Site, ...]]] = ()):
        self.weights = {s: float(w) for s, w in weights.items()}
        self.reads = tuple(dict.fromkeys(reads))
        self.bias = float(bias)
        self.norms = [(float(c), tuple(sites)) for c, sites in norms if c != 0]

    def terms(self) -> list[tuple[float, Objective]]:
        return [(1.0, self)]

    def __add__(self, other: object) -> Objective:
        if isinstance(other, Readout):
            w = dict(self.weights)
            for s, v in other.weights.items():
                w[s] = w.get(s, 0.0) + v
            return Readout(w, [*self.reads, *other.reads], self.bias + other.bias, [*self.norms, *other.norms])
        return super().__add__(other)

    def __mul__(self, c: float) -> Objective:
        if not isinstance(c, int | float):
            return NotImplemented
        return Readout({s: c * w for s, w in self.weights.items()}, self.reads, c * self.bias,
                       [(c * k, sites) for k, sites in self.norms])

    __rmul__ = __mul__

    @property
    def linear(self) -> bool:
        return not self.norms

    @property
    def sites(self) -> list[Site]:
        """Every site read: the linear part's, then each norm's (in order, without repeats)."""
        return list(dict.fromkeys([*self.weights, *(s for _, sites in self.norms for s in sites)]))

    @property
    def layers(self) -> list[int]:
        return sorted({s.layer for s in self.sites})

    def value(self, reading: Reading) -> torch.Tensor:
        return Readouts(reading.model, [self] * reading.rows).value(reading)


def neuron(site: Site) -> Readout:
    return Readout({site: 1.0}, [str(site)])


def mean(sites: Sequence[Site]) -> Readout:
    """The group objective: the mean over `sites` (each weighted 1/k)."""
    return Readout({s: 1.0 / len(sites) for s in sites}, [str(s) for s in sites])


def direction(layer: int, point: str, vector: torch.Tensor, bias: float = 0.0, name: str | None = None) -> Readout:
    """h . v (+ bias): the activation vector of `point` in `layer`, dotted with `vector` as given."""
    v = vector.detach().float().cpu()
    return Readout({Site(layer, point, u): float(x) for u, x in enumerate(v.tolist())},
                   [name or f"layer.{layer}.{point}"], bias)


def norm_of(sites: Sequence[Site], name: str) -> Readout:
    """|| act(sites) ||_2: e.g. an attention head, the norm of its context vector."""
    return Readout({}, [name], 0.0, [(1.0, tuple(sites))])


def head_norm(model: nn.Module, layer: int, head: int) -> Readout:
    """An attention head: the L2 norm of its context vector at the read position."""
    return norm_of(head_sites(model, layer, head), f"layer.{layer}.head.{head}")


def as_readout(target: Readout | Sequence[Site]) -> Readout:
    """A Readout as it is (or any other objective), or a list of sites as their mean (a neuron is a
    group of one)."""
    return target if isinstance(target, Objective) else mean(list(target))


class Readouts(Objective):
    """A batch of readouts, one per row, compiled into one `SiteIndex` (validated on `model`).

    Slots [n, k]: each row's linear sites (weight w), then its norms' sites (weight 0, group j);
    `combine` turns the values gathered at the slots into each row's objective."""

    def __init__(self, model: nn.Module, readouts: Sequence[Readout | Sequence[Site]], max_layer: int | None = None):
        self.readouts = [as_readout(r) for r in readouts]
        slots = [[*r.weights, *(s for _, sites in r.norms for s in sites)] for r in self.readouts]
        weights = [[*r.weights.values(), *(0.0 for _, sites in r.norms for _ in sites)] for r in self.readouts]
        self.index = SiteIndex(model, slots, max_layer=max_layer, weights=weights)
        self.bias = torch.tensor([r.bias for r in self.readouts])  # [n]
        self.has_bias = bool(self.bias.abs().sum() > 0)
        G = max((len(r.norms) for r in self.readouts), default=0)
        self.groups: torch.Tensor | None = None  # [n, k, G] one-hot: which slots form norm j of a row
        if G:
            k = self.index.index.shape[1]
            self.groups = torch.zeros(len(self.readouts), k, G)
            self.group_coef = torch.zeros(len(self.readouts), G)
            for row, r in enumerate(self.readouts):
                at = len(r.weights)
                for j, (c, sites) in enumerate(r.norms):
                    self.groups[row, at : at + len(sites), j] = 1.0
                    self.group_coef[row, j] = c
                    at += len(sites)

    def __len__(self) -> int:
        return len(self.readouts)

    def combine(self, values: torch.Tensor, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """[..., n]: the objectives of `rows` from the values at their slots, `values` [..., n, k]."""
        w = self.index.weight[rows].to(values.device, values.dtype)
        out = (values * w).sum(-1)
        if self.has_bias:
            out = out + self.bias[rows].to(values.device, values.dtype)
        if self.groups is not None:
            g = self.groups[rows].to(values.device, values.dtype)
            sq = torch.einsum("...nk,nkg->...ng", values.pow(2), g)
            # a row without norm j (another row's head) has sq = 0 there: sqrt'(0) = inf would turn its
            # coefficient 0 into NaN gradients, so the root starts at the dtype's smallest normal number
            root = sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()
            out = out + (root * self.group_coef[rows].to(values.device, values.dtype)).sum(-1)
        return out

    def value(self, reading: Reading) -> torch.Tensor:
        return self.combine(reading.site_values(self.index))


class ClassLogit(Objective):
    """A fine-tuned sequence classifier's logit for one class, from the checkpoint's own head on the
    framed input (`[CLS] x [SEP]`): the whole model runs, so it has no sites and no lean path."""

    def __init__(self, classifier: nn.Module, target_class: int, label: str):
        self.classifier, self.target_class, self.label = classifier, int(target_class), label
        self.reads = (f"logit.{self.target_class}",)
        self.sites: list[Site] = []
        self.layers = [adapter_of(classifier).num_layers - 1]

    def value(self, reading: Reading) -> torch.Tensor:
        return ClassLogits([self] * reading.rows).value(reading)


def adapter_of(classifier: nn.Module):
    from ft.model.arch import adapter

    return adapter(classifier.base_model)


class ClassLogits(Objective):
    """A batch of class logits, one class per row: one forward of the classifier."""

    def __init__(self, rows: Sequence[ClassLogit]):
        self.rows = list(rows)
        self.classifier = self.rows[0].classifier
        self.classes = torch.tensor([r.target_class for r in self.rows])

    def __len__(self) -> int:
        return len(self.rows)

    def value(self, reading: Reading) -> torch.Tensor:
        given = {"input_ids": reading.input_ids} if reading.input_ids is not None else {"inputs_embeds": reading.seq}
        logits = self.classifier(**given).logits  # [n, classes]
        return logits.gather(1, self.classes.to(logits.device)[:, None])[:, 0]


ClassLogit.batch_class = ClassLogits  # a chunk of class logits: one forward of the classifier


def batch_of(model: nn.Module, objectives: Sequence, max_layer: int | None = None) -> Objective:
    """The batch objective of one chunk of rows: readouts compile to one SiteIndex; an objective
    that is not a readout names its own batch class (`batch_class`: class logits, attention
    weights), which runs one forward for the chunk. A chunk mixes no kinds (TargetError)."""
    classes = {getattr(type(o), "batch_class", None) for o in objectives}
    if len(classes) > 1:
        raise TargetError("targets of different kinds cannot share a run; valid: one target kind per run")
    batch = classes.pop() if classes else None
    return batch(list(objectives)) if batch is not None else Readouts(model, objectives, max_layer=max_layer)


def top_layer(objective: Readout | ClassLogit | Sequence[Site]) -> int:
    """The highest layer a row's objective reads (a class logit reads them all)."""
    return max(as_readout(objective).layers) if not isinstance(objective, ClassLogit) else objective.layers[-1]


class InputNorm(Objective):
    """Per row: the sum over tokens of the raw input's squared norm (reg.norm's measure)."""

    def value(self, reading: Reading) -> torch.Tensor:
        return reading.embeds.float().pow(2).sum((1, 2))


class WordDistance(Objective):
    """Per row: sum over tokens of 1 - cos(token, nearest word) in the analysis space (reg.word's
    measure). `word_unit` [V', E]: the words' analysis vectors, unit length."""

    def __init__(self, word_unit: torch.Tensor):
        self.word_unit = word_unit

    def value(self, reading: Reading) -> torch.Tensor:
        from ft.model.arch import adapter

        a = adapter(reading.model).embed(inputs_embeds=reading.seq)[:, 1:-1].float()
        a = nn.functional.normalize(a, dim=-1)
        if self.word_unit.device != a.device:  # moved once, with the first reading on that device
            self.word_unit = self.word_unit.to(a.device)
        unit = self.word_unit
        return (1 - (a @ unit.T).max(dim=-1).values).sum(1)


def __getattr__(name: str) -> object:  # a name that moved to another module still imports (ft.core.moved)
    from ft.core.moved import moved_attribute

    return moved_attribute(__name__, name)
