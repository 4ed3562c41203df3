"""Groups of neurons selected for a target word: its top-k units over all layers of a point, by
absolute activation or relative to each unit's maximum over the vocabulary (the paper's groups)."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from typing import Annotated, Any

import torch

from ft.core.errors import TargetError
from ft.core.typed import Choice, Int, Unique
from ft.model.sites import POINTS, Site, num_layers, point_width
from ft.model.vocab import SweepSummary, Vocabulary
from ft.targets.base import Target, check_word, refuse_empty
from ft.targets.objectives import mean
from ft.targets.registry import BuildContext, UnitKind, register

log = logging.getLogger(__name__)

SELECTIONS = ("absolute", "relative")
LATIN_WORD = re.compile(r"^[a-z]+$")


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


@register
class GroupKind(UnitKind):
    name = "group"
    option = "groups"
    summary_line = "a target word's top-k neurons of a point over all layers (selection absolute or relative)"
    keys = {"point": Choice(*POINTS), "k": Int(ge=1), "selection": Choice(*SELECTIONS),
            "words": Annotated[list[str], Unique] | None, "num_random": Int(ge=0), "num_frequent": Int(ge=0)}
    one_layer = False
    report_table = "groups"

    def check_model(self, t: dict, model: torch.nn.Module) -> None:
        if t.get("point") and t.get("k"):
            n, width = num_layers(model), point_width(model, t["point"])
            if t["k"] > n * width:
                raise TargetError(f"target.k={t['k']!r}; valid 1..{n * width} (all neurons of {t['point']})")

    def selection_point(self, t: Any) -> str | None:
        return t.point

    def selection_rows(self, t: Any, vocab: Vocabulary, tokenizer: object) -> list[int]:
        """The vocabulary rows of the target words (what a streamed selection keeps of the table)."""
        words = target_words(vocab, t.words, t.num_random, t.num_frequent, t.seed)
        return [check_word(w, vocab, tokenizer) for w in words]

    def build(self, ctx: BuildContext) -> list[Target]:
        t = ctx.cfg.target
        return group_targets(ctx.encoder.model, ctx.vocab, ctx.encoder.tokenizer, ctx.sweep, k=t.k,
                             selection=t.selection, point=t.point, words=t.words, num_random=t.num_random,
                             num_frequent=t.num_frequent, seed=t.seed)

    def label(self, t: Target) -> str:
        return f"{t.target_word} ({t.selection} k={t.k})"
