"""What a run is built of: its targets (through the unit-kind registry), numbered, sharded and
repeated for restarts, with the vocabulary facts they are measured against; the LightningModule
for its input kind; and the tables made of a fit (best restarts, curves, the fluency frontier).
"""

from __future__ import annotations

import logging

import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ft.core.errors import ConfigError
from ft.data.directions import DirectionSet
from ft.engine.module import TextualizationModule, rows_for_budget
from ft.engine.state import FitResult
from ft.engine.strategy import shard_rows
from ft.inputs import find_input_kind, input_kind
from ft.measure.metrics import VocabFacts, target_word_rows
from ft.measure.word_stats import forward_word_stats, logit_word_stats, stream_word_stats
from ft.model.encoder import Encoder
from ft.model.vocab import Vocabulary, analysis_vectors, load_or_sweep, stream_summary, sweep_bytes
from ft.targets import (
    Target,
    number_targets,
    with_restarts,
)
from ft.targets.registry import BuildContext, unit_kind

log = logging.getLogger("ft")


def build_targets(cfg: DictConfig, encoder: Encoder, vocab: Vocabulary, sweep,
                  directions: DirectionSet | None = None, resumed_sae: dict | None = None) -> list[Target]:
    """The targets `cfg.target` names, built by its kind (`ft.targets.registry`)."""
    ctx = BuildContext(cfg, encoder, vocab, sweep, directions, resumed_sae)
    return unit_kind(cfg.target.kind).build(ctx)


def swap_search(cfg: DictConfig) -> bool:
    """The run's input is found by token search (input=tokens), not by gradient steps."""
    kind = find_input_kind(cfg.input.get("kind"))
    return kind is not None and kind.swap_search


def select_targets(cfg: DictConfig, targets: list[Target]) -> list[Target]:
    """Number the targets, keep this shard's block, repeat each for its restarts."""
    targets = number_targets(targets)
    shard, num = cfg.target.get("shard", 0), cfg.target.get("num_shards", 1)
    if not isinstance(num, int) or num < 1 or not isinstance(shard, int) or not 0 <= shard < num:
        raise ConfigError(f"target.shard={shard!r}, target.num_shards={num!r}; "
                          "valid: 0 <= shard < num_shards")
    if num > len(targets):
        raise ConfigError(f"target.num_shards={num} > {len(targets)} targets")
    copies = cfg.engine.restarts
    if swap_search(cfg):  # the search's members, at each fluency weight, are restarts too
        copies = copies * cfg.search.population * len(fluency_weights(cfg))
    return with_restarts(targets[shard_rows(len(targets), shard, num)], copies)


def fluency_weights(cfg: DictConfig) -> list[float]:
    from ft.measure.fluency import check_weights

    w = cfg.search.get("fluency_weights", [0])
    return check_weights(OmegaConf.to_object(w) if OmegaConf.is_config(w) else w)


def row_fluency_weights(cfg: DictConfig, targets: list[Target]) -> list[float]:
    """Each row's fluency weight: a target's restarts come weight by weight, each weight's block
    `engine.restarts x search.population` rows long."""
    weights = fluency_weights(cfg)
    block = cfg.engine.restarts * cfg.search.population
    return [weights[t.restart // block] for t in targets]


def frontier_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per target and fluency weight, the member whose objective + weight x fluency is best."""
    score = (df["objective"] + df["fluency_weight"] * df["fluency"]).where(~df["diverged"], -float("inf"))
    best = score.groupby([df["target_id"], df["fluency_weight"]]).idxmax().to_numpy()
    cols = ["target_id", "fluency_weight", "token_ids", "text", "objective", "fluency", "fluency_source"]
    return df.loc[best, cols].sort_values(["target_id", "fluency_weight"]).reset_index(drop=True)


def best_restarts(df: pd.DataFrame, tensors: dict[str, torch.Tensor]
                  ) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """Keep each target's best restart (diverged ones last); record every restart's objective."""
    if df["restart"].max() == 0:
        return df, tensors
    score = df["objective"].where(~df["diverged"], -float("inf"))
    best = score.groupby(df["target_id"]).idxmax().to_numpy().copy()
    kept = df.loc[best].copy()
    kept["restart_objectives"] = [list(g) for _, g in df.groupby("target_id")["objective"]]
    return kept.reset_index(drop=True), {k: v[torch.as_tensor(best)].contiguous() for k, v in tensors.items()}


def curve_table(result: FitResult, targets: list[Target], kept: pd.DataFrame) -> pd.DataFrame:
    """Per-target activation curves of the kept rows (best restarts), in long format."""
    values = result.curves  # [samples, rows]
    keep = {(t, r) for t, r in zip(kept["target_id"], kept["restart"], strict=True)}
    cols = [i for i, tg in enumerate(targets) if (tg.target_id, tg.restart) in keep]
    steps = torch.tensor(result.curve_steps, dtype=torch.long).repeat_interleave(len(cols))
    ids = torch.tensor([targets[i].target_id for i in cols], dtype=torch.long).repeat(len(result.curve_steps))
    return pd.DataFrame({"step": steps.numpy(), "target_id": ids.numpy(),
                         "objective": values[:, cols].flatten().numpy()})


def build_module(cfg: DictConfig, encoder: Encoder, targets: list[Target],
                 facts: VocabFacts) -> TextualizationModule:
    kind = input_kind(cfg.input.kind)
    if kind.swap_search:
        return build_search_module(cfg, encoder, targets, facts)
    optimizer = instantiate(cfg.optim)
    extra = {"allowed": facts.vocab.ids} if kind.needs_vocabulary_ids else {}  # e.g. PEZ projects onto words
    inputs = instantiate(cfg.input)(
        target_ids=[t.init_id for t in targets], word_embeddings=encoder.word_embeddings,
        seed=cfg.seed, optimizer=optimizer, **extra,
    )
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    e = cfg.engine
    # literal one-hot rows count toward the memory budget too
    row = inputs.param[0].numel() if inputs.param.shape[-1] != encoder.embedding_size else 0
    chunk, fast = engine_chunk(cfg, encoder, row), fast_choice(cfg)
    return TextualizationModule(
        encoder.model, [t.readout for t in targets], inputs, optimizer,
        cls_id=facts.vocab.cls_id, sep_id=facts.vocab.sep_id, position=cfg.position,
        chunk_size=chunk, converge_window=e.converge_window, converge_tol=e.converge_tol,
        stop_when_converged=e.stop_when_converged, freeze_converged=e.freeze_converged,
        scheduler=scheduler, reg_norm=cfg.reg.norm, reg_word=cfg.reg.word,
        word_vectors=facts.word_vectors, curve_every=e.curve_every, fast_forward=fast,
        keep=e.get("keep", "last"),
    )


def engine_chunk(cfg: DictConfig, encoder: Encoder, input_row_floats: int = 0) -> int:
    """engine.chunk_size: rows per chunk, `auto` from the memory budget (`rows_for_budget`)."""
    chunk = cfg.engine.chunk_size
    if chunk == "auto":
        return rows_for_budget(encoder.model, cfg.input.length, cfg.engine.memory_budget_mb, input_row_floats)
    if not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"engine.chunk_size={chunk!r}; valid: auto or an integer >= 1")
    return chunk


def fast_choice(cfg: DictConfig) -> bool | None:
    """engine.fast_forward: None (auto: the lean forward where the family has one), True, False."""
    choices, fast = {"auto": None, True: True, False: False}, cfg.engine.get("fast_forward", "auto")
    if fast not in choices:
        raise ConfigError(f"engine.fast_forward={fast!r}; valid: auto, true, false")
    return choices[fast]


def build_search_module(cfg: DictConfig, encoder: Encoder, targets: list[Target], facts: VocabFacts
                        ) -> TextualizationModule:
    """input=tokens: the token search (ft.engine.search) on the same engine; the optimizer is unused."""
    from ft.engine.search import SearchSettings, TokenSearchModule

    log.info("input=tokens: gradient-guided token search; optim.* is unused (the swap step is the update) and "
             "each row keeps the best sequence it saw (engine.keep does not apply)")
    from ft.measure.fluency import build_fluency

    inputs = instantiate(cfg.input)(target_ids=[t.init_id for t in targets], word_embeddings=encoder.word_embeddings,
                                    allowed=facts.vocab.ids, seed=cfg.seed)
    s, e = cfg.search, cfg.engine
    fluency = build_fluency(s.get("fluency_model", "auto"), encoder, facts.vocab, cfg.model.name_or_path,
                            cfg.model.trust_remote_code)
    log.info("fluency of the texts: %s; weights %s", fluency.name, fluency_weights(cfg))
    return TokenSearchModule(
        encoder.model, [t.readout for t in targets], inputs, None, cls_id=facts.vocab.cls_id,
        sep_id=facts.vocab.sep_id, position=cfg.position, chunk_size=engine_chunk(cfg, encoder),
        stop_when_converged=e.stop_when_converged, curve_every=e.curve_every, fast_forward=fast_choice(cfg),
        keep=e.get("keep", "last"), search=SearchSettings(s.topk, s.candidates, s.population, s.patience),
        seed=cfg.seed, fluency=fluency, row_weights=row_fluency_weights(cfg, targets))


def prepare_targets(cfg: DictConfig, encoder: Encoder, directions: DirectionSet | None = None,
                    resumed_sae: dict | None = None) -> tuple[list[Target], VocabFacts]:
    """This run's targets (numbered, sharded, restarts repeated) and the vocabulary facts they are
    measured against: the sweep of every point their sites use, the analysis vectors at `position`.

    A point whose full vocabulary table is larger than `engine.sweep_budget_mb` (XLM-R's 250,002
    tokens) is streamed instead: one pass for group selection, one for the word statistics,
    never holding the table (and not cached)."""
    vocab = Vocabulary.from_tokenizer(encoder.tokenizer)
    budget = float(cfg.engine.get("sweep_budget_mb", 2048)) * 2**20
    sweeps: dict[str, torch.Tensor] = {}  # point -> vocabulary sweep, each computed (or read) once

    def streamed(point: str) -> bool:
        return sweep_bytes(encoder, vocab, point) > budget

    def sweep_of(point: str) -> torch.Tensor:
        if point not in sweeps:
            sweeps[point] = load_or_sweep(encoder, vocab, point, position=1, use_cache=cfg.cache)
        return sweeps[point]

    source = None
    kind = unit_kind(cfg.target.kind)
    point = kind.selection_point(cfg.target)  # groups are selected from the sweep of target.point
    if point is not None:
        if streamed(point):
            rows = kind.selection_rows(cfg.target, vocab, encoder.tokenizer)
            log.info("vocabulary table of %s too large for engine.sweep_budget_mb=%s: streaming it", point,
                     cfg.engine.get("sweep_budget_mb", 2048))
            source = stream_summary(encoder, vocab, point, rows)
        else:
            source = sweep_of(point)
    targets = select_targets(cfg, build_targets(cfg, encoder, vocab, source, directions, resumed_sae))
    used = sorted({s.point for t in targets for s in t.sites})  # sites may mix points
    vectors = analysis_vectors(encoder, vocab, cfg.position)
    objectives = [t.readout for t in targets]
    if kind.word_stats == "classifier":  # no sites: every word through the classifier
        return targets, VocabFacts(vocab, vectors, logit_word_stats(encoder, vocab, objectives))
    if kind.word_stats == "forward":  # no sites to sweep: every word through the objective
        words = forward_word_stats(encoder, vocab, objectives, target_word_rows(vocab, targets))
        return targets, VocabFacts(vocab, vectors, words)
    if any(streamed(p) for p in used):
        words = stream_word_stats(encoder, vocab, [t.readout for t in targets], target_word_rows(vocab, targets))
        return targets, VocabFacts(vocab, vectors, words)
    facts = VocabFacts.build(vocab, vectors, {p: sweep_of(p) for p in used}, encoder.model, targets)
    return targets, facts  # the sweeps (~1 GB each for bert-base) go out of scope here
