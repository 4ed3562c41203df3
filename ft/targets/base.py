"""What to textualize: single neurons, groups of neurons selected for target words, expressions
over sites (`terms`), and directions read from a file. Each target holds its objective as a
`Readout` (ft.targets.objectives); `kind` only says how it was made."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ft.core.errors import TargetError
from ft.data.directions import DirectionSet
from ft.model.sites import Site, SiteError, num_layers, parse_head, parse_point, point_width
from ft.model.vocab import SweepSummary, Vocabulary
from ft.targets.objectives import Readout, as_readout, direction, head_norm, mean, neuron, parse
from ft.targets.sae_file import SAE

log = logging.getLogger(__name__)

SELECTIONS = ("absolute", "relative")
KINDS = ("neuron", "group", "cluster", "terms", "direction", "head", "sae", "logit")
LATIN_WORD = re.compile(r"^[a-z]+$")


@dataclass
class Target:
    kind: str  # one of KINDS
    readout: Readout  # the objective: weights over sites
    target_word: str | None = None
    k: int | None = None
    selection: str | None = None
    spec: str | None = None  # the expression as written (terms), `layer.L.point@ROW` (direction)
    direction: int | None = None  # row of the directions file
    direction_name: str | None = None
    latent: int | None = None  # an SAE latent's index
    sae_path: str | None = None  # the SAE directory it belongs to
    target_class: int | None = None  # a class logit's class id
    target_id: int = -1  # row in the full (unsharded) run, set by `number_targets`
    restart: int = 0  # which random restart of the target this row is
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.readout, Readout):  # a list of sites: their mean
            self.readout = as_readout(self.readout)

    @property
    def sites(self) -> list[Site]:
        """Every unit the objective weighs (a direction: every unit of its point)."""
        return self.readout.sites

    @property
    def reads(self) -> list[str]:
        """The contract's `sites`: units as written, and a direction's whole point `layer.L.point`."""
        return list(self.readout.reads)

    @property
    def init_id(self) -> int:
        """Seeds the initial input: the same target and restart start from the same point."""
        return self.target_id + 1_000_000 * self.restart

    @property
    def label(self) -> str:
        """What a reader knows this unit by (the `label` column, console, report and exports)."""
        return unit_label(self)

    @property
    def layer(self) -> int | None:
        """The layer of a neuron or a direction, and of terms that all read one layer."""
        layers = self.readout.layers
        return layers[0] if self.kind not in ("group", "cluster", "logit") and len(layers) == 1 else None


def refuse_empty(key: str, given: Sequence | None) -> None:
    """An empty list where None means "sample" or "all" is a mistake, never a request to sample."""
    if given is not None and len(given) == 0:
        raise TargetError(f"{key} is an empty list; valid: null (ft picks them) or a non-empty list")


def unit_label(t: Target) -> str:
    """`layer.5.ffn_out.17`, `layer.3.resid:sae.861`, `layer.5.head.2`, `logit.1 (pos)`, a group's
    word, a term's expression, a probe's concept and k: a name that tells two units apart."""
    if t.kind == "sae":
        return f"{t.spec}:sae.{t.latent}"
    if t.kind == "logit":
        return f"{t.spec} ({t.meta['label']})" if t.meta.get("label") is not None else str(t.spec)
    if t.kind == "group":
        return f"{t.target_word} ({t.selection} k={t.k})"
    if t.kind == "cluster":
        return f"cluster {t.target_id} ({t.k} units)"
    if t.kind == "direction" and t.direction_name is not None and t.spec is not None:
        return f"{t.spec.split('@')[0]}@{t.direction_name}"
    if "probe_concept" in t.meta:
        return f"probe {t.meta['probe_concept']} k={t.meta['probe_k']} {t.meta['probe_readout']}"
    if t.spec is not None:
        return str(t.spec)
    reads = t.reads
    return str(reads[0]) + (f" +{len(reads) - 1}" if len(reads) > 1 else "")


def site_target(model: torch.nn.Module, text: str) -> Target:
    """One entry of `target.sites`: a neuron `layer.L.point.unit` or a head `layer.L.head.H`."""
    try:
        head = parse_head(text, model)
    except SiteError as e:
        raise TargetError(str(e)) from None
    if head is not None:
        return Target("head", head_norm(model, *head), spec=str(text).strip())
    return Target("neuron", neuron(Site.parse(text).check(model)))


def number_targets(targets: list[Target]) -> list[Target]:
    for i, t in enumerate(targets):
        t.target_id = i
    return targets


def with_restarts(targets: list[Target], restarts: int) -> list[Target]:
    """Each target `restarts` times in a row (restart 0 starts where a single run starts)."""
    if not isinstance(restarts, int) or restarts < 1:
        raise TargetError(f"engine.restarts={restarts!r}; valid: an integer >= 1")
    return [replace(t, restart=r) for t in targets for r in range(restarts)]


def neuron_targets(
    model: torch.nn.Module,
    sites: Sequence[str] | None = None,
    point: str = "ffn_out",
    fraction: float | None = None,
    per_layer: int | None = None,
    layers: Sequence[int] | None = None,
    seed: int = 0,
) -> list[Target]:
    """An explicit site list, or a seeded random sample of units per layer (`sites` None; an empty
    list is refused: it never means "sample")."""
    refuse_empty("target.sites", sites)
    refuse_empty("target.layers", layers)
    if sites is not None:
        return [site_target(model, s) for s in sites]
    n_layers = num_layers(model)
    layers = list(range(n_layers)) if layers is None else list(layers)
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise TargetError(f"layer {layer} out of range; valid 0..{n_layers - 1}")
    width = point_width(model, point)
    if per_layer is None:
        if fraction is None or not 0 < fraction <= 1:
            raise TargetError(f"target.fraction={fraction!r}; valid: 0 < fraction <= 1")
        per_layer = max(1, round(fraction * width))
    if not 0 < per_layer <= width:
        raise TargetError(f"target.per_layer={per_layer}; valid 1..{width}")
    rng = random.Random(seed)
    out = []
    for layer in layers:
        for unit in sorted(rng.sample(range(width), per_layer)):
            out.append(Target("neuron", neuron(Site(layer, point, unit))))
    if not out:
        raise TargetError("no targets: target.layers is empty")
    return out


def check_word(word: str, vocab: Vocabulary, tokenizer: object) -> int:
    """Row of `word` in the vocabulary; TargetError if it is not one vocabulary item."""
    row = vocab.row_of().get(word)
    if row is None:
        pieces = tokenizer.tokenize(word)
        how = f"tokenizes to {pieces}" if len(pieces) > 1 else "is not in the vocabulary"
        raise TargetError(f"target word {word!r} {how}; target words must be single vocabulary items")
    return row


def pick_words(
    vocab: Vocabulary, num_random: int, num_frequent: int, seed: int = 0
) -> list[str]:
    """`num_random` random Latin-letter vocabulary items + `num_frequent` frequent English words."""
    rng = random.Random(seed)
    latin = [t for t in vocab.tokens if LATIN_WORD.match(t)]
    frequent: list[str] = []
    if num_frequent:
        from wordfreq import top_n_list

        known = set(latin)
        pool = [w for w in top_n_list("en", 300) if w in known and len(w) > 1]
        if len(pool) < num_frequent:
            raise TargetError(f"target.num_frequent={num_frequent}; only {len(pool)} available")
        frequent = rng.sample(pool, num_frequent)
    candidates = [t for t in latin if t not in set(frequent)]
    if num_random > len(candidates):
        raise TargetError(
            f"target.num_random={num_random}; the vocabulary has {len(candidates)} candidates"
        )
    return rng.sample(candidates, num_random) + frequent


def select_group(
    word_acts: torch.Tensor, a_max: torch.Tensor, k: int, selection: str
) -> tuple[torch.Tensor, int]:
    """Flat neuron indices of the top-k group for one word, and how many neurons were skipped.

    word_acts, a_max: [layers * width]. Relative selection divides by a_max and skips
    neurons whose a_max <= 0.
    """
    if selection == "absolute":
        score, skipped = word_acts, 0
    elif selection == "relative":
        valid = a_max > 0
        score = torch.where(valid, word_acts / a_max.clamp_min(1e-12), torch.tensor(-torch.inf))
        skipped = int((~valid).sum())
    else:
        raise TargetError(f"target.selection={selection!r}; valid: {list(SELECTIONS)}")
    usable = word_acts.numel() - skipped
    if not 0 < k <= usable:
        raise TargetError(f"target.k={k}; valid 1..{usable} (neurons available for {selection})")
    return torch.topk(score, k).indices, skipped


def target_words(vocab: Vocabulary, words: Sequence[str] | None, num_random: int, num_frequent: int,
                 seed: int = 0) -> list[str]:
    """The run's target words: the given ones, or `num_random` + `num_frequent` picked (seeded)."""
    refuse_empty("target.words", words)
    words = list(words) if words is not None else pick_words(vocab, num_random, num_frequent, seed)
    if not words:
        raise TargetError("no target words: target.words is empty and num_random + num_frequent = 0")
    return words


def group_targets(
    model: torch.nn.Module,
    vocab: Vocabulary,
    tokenizer: object,
    sweep: torch.Tensor | SweepSummary,
    k: int,
    selection: str = "relative",
    point: str = "ffn_out",
    words: Sequence[str] | None = None,
    num_random: int = 80,
    num_frequent: int = 20,
    seed: int = 0,
) -> list[Target]:
    """One group per target word: its top-k neurons over all layers of `point`.

    sweep: [V', layers, width] from the vocabulary sweep of `point`, or its `SweepSummary`
    (streamed, for vocabularies whose table does not fit).
    """
    if selection not in SELECTIONS:
        raise TargetError(f"target.selection={selection!r}; valid: {list(SELECTIONS)}")
    layers, width = (sweep.layers, sweep.width) if isinstance(sweep, SweepSummary) else sweep.shape[1:3]
    total = layers * width
    if not isinstance(k, int) or not 0 < k <= total:
        raise TargetError(f"target.k={k!r}; valid 1..{total} (all neurons of {point})")
    words = target_words(vocab, words, num_random, num_frequent, seed)
    rows = [check_word(word, vocab, tokenizer) for word in words]
    summary = sweep if isinstance(sweep, SweepSummary) else SweepSummary.of(sweep, rows)
    out = []
    skipped = 0
    for word, row in zip(words, rows, strict=True):
        idx, skipped = select_group(summary.rows[row], summary.a_max, k, selection)
        sites = [Site(int(i) // width, point, int(i) % width) for i in idx]
        out.append(Target("group", mean(sites), target_word=word, k=k, selection=selection))
    if skipped:
        log.info("relative selection skipped %d neurons with a_max <= 0", skipped)
    return out


def direction_lookup(model: torch.nn.Module, directions: DirectionSet | None):
    """`parse`'s lookup of `layer.L.point@NAME` in a directions file."""
    if directions is None:
        return None
    return lambda layer, point, name: directions.vector(name, point_width(model, point), point)


def terms_targets(model: torch.nn.Module, specs: Sequence[str] | None, directions: DirectionSet | None = None
                  ) -> list[Target]:
    """One target per expression (`ft.targets.objectives.parse`), e.g. 'layer.3.ffn_out.5 - 0.5 * layer.2.ffn_act.7'."""
    if not specs:
        raise TargetError("target.specs is empty; valid: a list of expressions, e.g. "
                          "'target.specs=[\"layer.3.ffn_out.5 - 0.5 * layer.2.ffn_act.7\"]'")
    lookup = direction_lookup(model, directions)
    return [Target("terms", parse(str(spec), model, lookup), spec=str(spec)) for spec in specs]


def probe_targets(model: torch.nn.Module, run: str, k: int) -> list[Target]:
    """The top `k` units of an ft.probe run (by rank_probe): their mean, and their sum weighted by
    the probe's signed weights (two labels only), each a terms target."""
    import math

    from ft.rundir.results import read_probe

    table = read_probe(run).sort_values("rank_probe")
    top = table.head(int(k))
    sites = list(top.site)
    specs = ["(" + " + ".join(sites) + f") / {len(sites)}"]
    weights = [float(w) for w in top.weight] if "weight" in top else []  # older probe runs: no signed weights
    if weights and all(math.isfinite(w) for w in weights) and any(w != 0 for w in weights):
        specs.append(" + ".join(f"{w:.6g} * {s}" for w, s in zip(weights, sites, strict=True) if w != 0)
                     .replace("+ -", "- "))
    out = terms_targets(model, specs)
    concept = probe_concept(run)
    for t, what in zip(out, ("mean", "weighted"), strict=False):
        t.meta.update(probe_run=str(run), probe_readout=what, probe_concept=concept, probe_k=len(sites))
    return out


def probe_concept(run: str) -> str:
    """The concept an ft.probe run probed (its config's `concept`), or the run's folder name."""
    from ft.rundir.results import read_config

    try:
        concept = str(read_config(run).concept)
    except Exception:  # a probe run without a readable config still names itself
        return Path(str(run)).name
    return Path(concept).name if "/" in concept else concept  # a file by its name; builtin:months as is


def direction_targets(model: torch.nn.Module, directions: DirectionSet, sites: str | Sequence[str]) -> list[Target]:
    """One target per row of the file, at each of `sites` (`layer.L.point`): objective h . v."""
    sites = [sites] if isinstance(sites, str) else list(sites or [])
    if not sites:
        raise TargetError("target.site is empty; valid: a site 'layer.<L>.<point>' or a list of them")
    out = []
    for text in sites:
        try:
            layer, point = parse_point(text, model)
        except SiteError as e:
            raise TargetError(f"target.site: {e}") from None
        width = point_width(model, point)
        for row in range(len(directions)):
            v = directions.vector(str(row), width, point)
            out.append(Target("direction", direction(layer, point, v), spec=f"layer.{layer}.{point}@{row}",
                              direction=row, direction_name=directions.name(row)))
    return out


def readouts_of_table(model: torch.nn.Module, table, directions: DirectionSet | None = None,
                      run_dir: str | Path | None = None) -> list[Readout]:
    """Each row's objective rebuilt from a targets table (`targets.parquet`): neurons and groups are
    the mean of their `sites`, terms and directions their `spec` (directions from the run's copy).
    SAE rows read the run's kept SAE (`ft.rundir.kept`, verified) when `run_dir` is given and has one;
    only runs from before ft kept inputs re-read `sae_path`."""
    from ft.rundir.kept import kept

    lookup = direction_lookup(model, directions)
    kept_sae = kept(run_dir, "sae") if run_dir is not None else None
    out, saes = [], {}
    for row in table.itertuples():
        spec = getattr(row, "spec", None)
        if row.kind == "logit":
            raise TargetError("class logit targets are rebuilt from the classifier (ft.targets.logit_targets), "
                              "not from a targets table")
        if row.kind == "sae":
            from ft.targets.sae_file import load_sae

            if row.sae_path not in saes:
                saes[row.sae_path] = load_sae(kept_sae or row.sae_path)
            sae = saes[row.sae_path]
            layer, point = parse_point(row.sites[0], model)
            check_sae_fits(sae, model, point)
            out.append(sae.readout(layer, point, int(row.latent)))
        elif row.kind in ("terms", "direction", "head") and isinstance(spec, str):
            out.append(parse(spec, model, lookup))
        else:
            out.append(mean([Site.parse(s).check(model) for s in row.sites]))
    return out


def check_sae_fits(sae: SAE, model: torch.nn.Module, point: str) -> None:
    width = point_width(model, point)
    if sae.d_in != width:
        raise TargetError(f"target.path={sae.source!r}: the SAE reads d_in={sae.d_in}, {point} is {width} wide in this "
                          f"model; valid: an SAE trained on {point} of this model")


def sae_targets(model: torch.nn.Module, sae: SAE, site: str, latents: Sequence[int] | None = None,
                fraction: float | None = None, num_latents: int | None = None, seed: int = 0) -> list[Target]:
    """One target per SAE latent: its pre-activation at `site` (`layer.L.point`). `latents`, or a
    seeded sample: `fraction` of them, else `num_latents`."""
    try:
        layer, point = parse_point(site, model)
    except SiteError as e:
        raise TargetError(f"target.site: {e}") from None
    check_sae_fits(sae, model, point)
    refuse_empty("target.latents", latents)
    if latents is not None:
        bad = [i for i in latents if not 0 <= int(i) < sae.d_sae]
        if bad:
            raise TargetError(f"target.latents: {bad[0]} out of range; valid 0..{sae.d_sae - 1}")
        chosen = [int(i) for i in latents]
    else:
        n = max(1, round(fraction * sae.d_sae)) if fraction else int(num_latents or 1)
        if not 0 < n <= sae.d_sae:
            raise TargetError(f"target.num_latents={n}; valid 1..{sae.d_sae}")
        chosen = sorted(random.Random(seed).sample(range(sae.d_sae), n))
    return [Target("sae", sae.readout(layer, point, i), spec=f"layer.{layer}.{point}", latent=i, sae_path=sae.source,
                   meta={"sae": sae, "layer": layer, "point": point}) for i in chosen]


def logit_targets(encoder, classes: Sequence[int | str] | None) -> list[Target]:
    """One target per class of a fine-tuned sequence classifier (ids, or label names from its
    `id2label`): the objective is that class's logit from the checkpoint's own head."""
    from ft.targets.objectives import ClassLogit

    head = getattr(encoder, "head", None)
    kind = type(head).__name__ if head is not None else None
    if head is None or not kind.endswith("ForSequenceClassification"):
        raise TargetError(f"target=logits needs a fine-tuned sequence classifier; {encoder.name!r} is "
                          f"{kind or 'a bare encoder'}; valid: a *ForSequenceClassification checkpoint")
    id2label = {int(i): str(n) for i, n in (head.config.id2label or {}).items()}
    n = int(head.config.num_labels)
    by_name = {v: k for k, v in id2label.items()}
    refuse_empty("target.classes", classes)
    chosen = []
    for c in list(classes) if classes is not None else list(range(n)):
        if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < n:
            chosen.append(c)
        elif isinstance(c, str) and c in by_name:
            chosen.append(by_name[c])
        elif isinstance(c, str) and c.isdigit() and int(c) < n:
            chosen.append(int(c))
        else:
            raise TargetError(f"target.classes: {c!r} is not a class of {encoder.name!r}; valid: ids 0..{n - 1} or "
                              f"labels {[id2label.get(i, str(i)) for i in range(n)]}")
    return [Target("logit", ClassLogit(head, c, id2label.get(c, str(c))), spec=f"logit.{c}",
                   target_class=c, meta={"label": id2label.get(c, str(c))}) for c in chosen]
