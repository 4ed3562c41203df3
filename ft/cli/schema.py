"""Types and ranges of every config value, declared once as dataclass schemas, and the checks
that refuse a bad value before anything is written.

Each schema field is `Annotated[type, Rule(...)]`: the type (int, float, bool, str, None,
Literal[...], list[...] and unions of these) and the range or shape the value must have. A node
of the composed config is checked against its schema key by key: a key the schema does not
declare is left alone in nodes that pass through to third-party code (trainer, optim, logger),
and refused in ft's own nodes, where it can only be a typo. `check_config` runs the schemas and
the checks that relate several keys; `check_model` the ones that need the model's config.
"""

from __future__ import annotations

import importlib
import types
import typing
from dataclasses import dataclass, fields, make_dataclass
from typing import Annotated, Any, Literal, Union

from omegaconf import DictConfig, OmegaConf

from ft.core.errors import ConfigError, FtError
from ft.core.typed import Choice, Int, Num, Rule, Unique  # noqa: F401 (ft.cli.schema.Rule, as before)
from ft.inputs import find_input_kind, input_kinds
from ft.model.sites import POINTS, Site
from ft.targets.registry import all_spellings, unit_kind, unit_kinds

PRECISIONS = (64, 32, 16, "64", "32", "16", "bf16", "16-true", "16-mixed", "bf16-true", "bf16-mixed", "32-true",
              "64-true", "transformer-engine", "transformer-engine-float16")  # Lightning 2.x's _PRECISION_INPUT


# -- the schemas ----------------------------------------------------------------------------------
@dataclass
class ModelSchema:
    name_or_path: str
    trust_remote_code: bool


# target.*: the keys every kind shares, then each kind's own (ft.targets.kinds/*: `UnitKind.keys`)
SHARED_TARGET_KEYS: dict[str, Any] = {"seed": Int(ge=0, lt=2**32), "shard": Int(ge=0), "num_shards": Int(ge=1)}


def target_keys() -> dict[str, tuple[str, ...]]:
    """kind -> the `target.*` keys it reads (shared ones included)."""
    return {name: ("kind", *unit_kind(name).keys, *SHARED_TARGET_KEYS) for name in unit_kinds()}


def target_schema() -> type:
    """The `target` node's schema: `kind` (a registered kind or an alias), the shared keys and
    every kind's keys (a key two kinds declare with different types accepts either)."""
    fields_: dict[str, Any] = {"kind": Choice(*all_spellings()), **SHARED_TARGET_KEYS}
    for name in unit_kinds():
        for key, tp in unit_kind(name).keys.items():
            fields_[key] = tp if fields_.get(key, tp) == tp else fields_[key] | tp
    return make_dataclass("TargetSchema", list(fields_.items()))


def target_nodes() -> dict[str, tuple[type, bool]]:
    """Sub-nodes of `target` a kind declares (`target.demo` of target=sae), closed."""
    return {f"target.{key}": (schema, True) for name in unit_kinds() for key, schema in unit_kind(name).nodes.items()}


@dataclass
class SearchSchema:
    """configs/train.yaml `search`: input=tokens's token search."""

    topk: Int(ge=1)
    candidates: Int(ge=1)
    population: Int(ge=1)
    patience: Int(ge=1)
    fluency_weights: Annotated[list[Num(ge=0)], Unique] | Num(ge=0)
    fluency_model: str


@dataclass
class InputSchema:
    _target_: str
    _partial_: bool
    kind: Choice(*input_kinds())
    length: Int(ge=1)
    init_std: Num(ge=0)
    tau_start: Num(gt=0)
    tau_end: Num(gt=0)
    anneal_steps: Int(ge=1) | None
    save_raw: bool
    fast: Choice("auto") | bool


@dataclass
class OptimSchema:  # the other keys go to the optimizer as they are
    _target_: str
    lr: Num(gt=0)
    momentum: Num(ge=0)
    weight_decay: Num(ge=0)


@dataclass
class SchedulerSchema:
    _target_: str
    T_max: Int(ge=1)
    gamma: Num(gt=0)


@dataclass
class RegSchema:
    norm: Num(ge=0)
    word: Num(ge=0)


@dataclass
class TrainerSchema:  # the other keys go to pl.Trainer as they are
    max_steps: Int(gt=0)
    log_every_n_steps: Int(ge=1)
    precision: Choice(*PRECISIONS)
    accelerator: Choice("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")
    devices: Int(ge=1) | Choice("auto", -1) | Annotated[list[Int(ge=0)], Unique]
    num_nodes: Int(ge=1)
    num_sanity_val_steps: Int(ge=0)
    enable_model_summary: bool
    use_distributed_sampler: bool
    strategy: str


@dataclass
class EngineSchema:
    chunk_size: Choice("auto") | Int(ge=1)
    fast_forward: Choice("auto") | bool
    memory_budget_mb: Num(gt=0)
    converge_window: Int(ge=1)
    converge_tol: Num(ge=0)
    stop_when_converged: bool
    runaway_factor: Num(gt=0)
    checkpoint_every_n_steps: Int(ge=1)
    freeze_converged: bool
    restarts: Int(ge=1)
    curve_every: Int(ge=1)
    keep: Choice("last", "best")
    sweep_budget_mb: Num(gt=0)


@dataclass
class WandbSchema:
    mode: Choice("auto", "online", "offline", "disabled")
    project: str


@dataclass
class CurvesSchema:
    max_targets: Int(ge=0)


@dataclass
class NearestSchema:
    every_n_steps: Int(ge=1)
    top_n: Int(ge=1)
    max_rows: Int(ge=1)


@dataclass
class RootSchema:
    seed: Int(ge=0, lt=2**32)
    position: Int(ge=1)
    experiment_name: str
    run_name: str | None
    tags: list[str]
    cache: bool
    print_rows: Int(ge=0)
    ckpt_path: str
    log_level: Choice("debug", "info", "warning", "error")
    examples_after_run: bool
    optimized_metric: str | None


@dataclass
class ProbeRootSchema:
    """configs/probe.yaml (ft.probe)."""

    concept: str
    point: Choice(*POINTS)
    layers: Annotated[list[Int(ge=0)], Unique] | None
    seed: Int(ge=0, lt=2**32)


@dataclass
class ProbeSettingsSchema:
    l1_ratio: Num(ge=0, le=1)
    C: Num(gt=0)
    test_fraction: Num(gt=0, lt=1)


@dataclass
class AblateSchema:
    top: Int(ge=0)
    sites: Annotated[list[str], Unique] | None
    mode: Choice("zero", "mean")
    seeds: Int(ge=0)
    mlm: str
    mlm_corpus: str | None
    mlm_sentences: Int(ge=1)


PROBE_NODES: dict[str, tuple[type, bool]] = {
    "": (ProbeRootSchema, False), "model": (ModelSchema, True), "probe": (ProbeSettingsSchema, True),
    "ablate": (AblateSchema, True),
}


# node path -> (schema, closed: unknown keys are refused)
NODES: dict[str, tuple[type, bool]] = {
    "": (RootSchema, False), "model": (ModelSchema, True),
    "input": (InputSchema, True), "optim": (OptimSchema, False), "scheduler": (SchedulerSchema, False),
    "reg": (RegSchema, True), "trainer": (TrainerSchema, False),
    "engine": (EngineSchema, True), "search": (SearchSchema, True),
    "logger.wandb": (WandbSchema, False), "callbacks.curves": (CurvesSchema, False),
    "callbacks.nearest": (NearestSchema, False),
}


# -- checking one value against a type -------------------------------------------------------------
def accepts(tp: Any, value: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return accepts(args[0], value) and not args[1].problem(value)
    if origin in (Union, types.UnionType):
        return any(accepts(a, value) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(accepts(args[0], v) for v in value)
    if tp is type(None) or tp is None:
        return value is None
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def describe(tp: Any) -> str:
    """`tp` in words, for the `valid:` part of an error."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        finite = "a finite number" if args[0] is float and args[1].bounded else describe(args[0])
        return finite + args[1].describe()
    if origin in (Union, types.UnionType):  # words first (null, auto, true, false), then the rest
        words = [describe(a) for a in args if a is type(None) or a is bool or typing.get_origin(a) is Literal]
        rest = [describe(a) for a in args if describe(a) not in words]
        return " or ".join([", ".join(words)] * bool(words) + rest)
    if origin is Literal:
        return ", ".join(dict.fromkeys(str(a).lower() if isinstance(a, bool) else str(a) for a in args))
    if origin is list:
        return f"a list of {describe(args[0]).replace('an integer', 'integers').replace('a string', 'strings')}"
    names = {int: "an integer", float: "a number", bool: "true, false", str: "a string", type(None): "null"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else OmegaConf.to_yaml(value).strip() if isinstance(
        value, dict) else str(value).replace("True", "true").replace("False", "false").replace("None", "null")


def fail(key: str, value: Any, valid: str) -> ConfigError:
    return ConfigError(f"{key}={show(value)}; valid: {valid}")


def check_node(path: str, node: Any, schema: type, closed: bool) -> None:
    if node is None:
        return
    if not isinstance(node, dict):
        raise fail(path, node, f"a config group ({path}=<option>) or its keys ({path}.<key>=<value>)")
    hints = typing.get_type_hints(schema, include_extras=True)
    for key, value in node.items():
        full = f"{path}.{key}" if path else key
        if key not in hints:
            if closed:
                raise ConfigError(f"{full}: unknown key; valid: {', '.join(f.name for f in fields(schema))}")
            continue
        if not accepts(hints[key], value):
            raise fail(full, value, describe(hints[key]))


# -- the whole config ------------------------------------------------------------------------------
def resolve_target(path: str, key: str) -> object:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{key}={path!r}: no such class") from None


def check_class(cfg: dict, node: str, base: type, valid: str) -> None:
    sub = cfg.get(node)
    if not isinstance(sub, dict) or "_target_" not in sub:
        return
    cls = resolve_target(str(sub["_target_"]), f"{node}._target_")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise fail(f"{node}._target_", sub["_target_"], valid)


def check_nodes(c: dict, nodes: dict[str, tuple[type, bool]]) -> None:
    for path, (schema, closed) in nodes.items():
        node: Any = c
        for part in path.split(".") if path else []:
            node = node.get(part) if isinstance(node, dict) else None
        check_node(path, node, schema, closed)


def check_probe_config(cfg: DictConfig | dict) -> None:
    """Every value of a composed `ft.probe` config has its declared type and range (ConfigError)."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    check_nodes(c, PROBE_NODES)
    if c.get("layers") == []:
        raise ConfigError("layers=[] is an empty list; valid: null (every layer) or a list of layers, e.g. [2,3]")
    ablate = c.get("ablate") or {}
    if ablate.get("sites") == []:
        raise ConfigError("ablate.sites=[] is an empty list; valid: null (the probe's top units) or a list of sites")
    for text in ablate.get("sites") or []:
        Site.parse(text)


def check_probe_model(cfg: DictConfig | dict, model_config: object) -> None:
    """`layers` are layers of the model."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    n = getattr(model_config, "num_hidden_layers", None)
    bad = [x for x in c.get("layers") or [] if isinstance(n, int) and not 0 <= x < n]
    if bad:
        raise ConfigError(f"layers={c['layers']}: layer {bad[0]} is out of range; valid: null (all) or layers in "
                          f"0..{n - 1}")


def check_config(cfg: DictConfig | dict) -> None:
    """Every value of a composed config has its declared type and range; keys that must agree do.
    Raises ConfigError (a one-line message naming the key, the value and what is valid)."""
    import torch

    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    check_nodes(c, {**NODES, "target": (target_schema(), True), **target_nodes()})
    check_class(c, "optim", torch.optim.Optimizer, "a torch.optim optimizer class, e.g. torch.optim.Adam")
    check_class(c, "scheduler", torch.optim.lr_scheduler.LRScheduler,
                "a torch.optim.lr_scheduler class, e.g. torch.optim.lr_scheduler.CosineAnnealingLR")
    length, position = c["input"]["length"], c["position"]
    kind = find_input_kind(c["input"].get("kind"))
    if kind is not None and kind.max_length is not None and length > kind.max_length:
        raise ConfigError(f"input.length={length}; valid 1..{kind.max_length} for input={kind.name}")
    if position > length:
        raise ConfigError(f"position={position}; valid 1..input.length={length}")
    t = c["target"]
    if t.get("shard", 0) >= t.get("num_shards", 1):
        raise ConfigError(f"target.shard={t['shard']}, target.num_shards={t['num_shards']}; "
                          "valid: 0 <= shard < num_shards")
    check_not_empty(t)
    check_target_kind(t)


# target keys where null means "sample" or "all": an empty list would silently mean the same
NULL_MEANS = {
    "sites": "null (a seeded sample of units per layer) or a list of sites, e.g. [layer.5.ffn_out.17]",
    "layers": "null (every layer) or a list of layer numbers, e.g. [2,3]",
    "words": "null (num_random + num_frequent words, seeded) or a list of words, e.g. [river,bank]",
    "latents": "null (a seeded sample) or a list of latent numbers, e.g. [3,17]",
    "classes": "null (every class) or a list of class ids or labels, e.g. [0,1]",
    "site": "null or a site 'layer.<L>.<point>' or a list of them",
}


def check_not_empty(t: dict) -> None:
    """An empty list where null means "sample" or "all" is refused: `target.sites=[]` must not run
    16 random neurons."""
    for key, valid in NULL_MEANS.items():
        if isinstance(t.get(key), list) and not t[key]:
            raise ConfigError(f"target.{key}=[] is an empty list; valid: {valid}")


def check_target_kind(t: dict) -> None:
    """The keys of `target` are its kind's, and its kind's config-only checks pass
    (`UnitKind.check`: expressions that parse, a directions file that is one, sites
    `layer.L.point`, a probe run that is one)."""
    from ft.core.errors import TargetError
    from ft.model.sites import SiteError

    kind = unit_kind(t.get("kind"))
    keys = target_keys()[kind.name]
    for key in t:
        if key not in keys:
            raise ConfigError(f"target.{key}: unknown key for target kind {kind.name!r}; valid: {', '.join(keys)}")
    try:
        kind.check(t)
    except (TargetError, SiteError) as e:
        raise ConfigError(str(e).replace("site ", "target.site: ", 1) if isinstance(e, SiteError) else str(e)) from None


def check_model(cfg: DictConfig | dict, model_config: object) -> None:
    """The checks that need the model's config: its family has an adapter (`ft.model.arch`), and the
    input fits its position embeddings."""
    from ft.model.arch import adapter_class

    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    name = c["model"]["name_or_path"]
    try:
        family = adapter_class(model_config)
    except FtError as e:
        raise ConfigError(f"model.name_or_path={name!r}: {e}") from None
    n = family.max_tokens(model_config)
    length = c["input"]["length"]
    if n is not None and length + 2 > n:
        raise ConfigError(f"input.length={length}; valid 1..{n - 2} for {name!r} "
                          f"({n} positions, the two framing special tokens take 2)")


def __getattr__(name: str) -> object:  # a name that moved to another module still imports (ft.core.moved)
    from ft.core.moved import moved_attribute

    return moved_attribute(__name__, name)
