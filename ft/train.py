"""`python -m ft.train [experiment=NAME] [key=value ...]`: one textualization run.

`run(cfg, run_dir)` does the work and is what tests call; `main` is the thin Hydra entry.
"""

from __future__ import annotations

import logging
import sys
import warnings
from contextlib import nullcontext
from importlib.resources import files
from pathlib import Path

import hydra
import pandas as pd
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ft.callbacks.checkpoint import AtomicCheckpoint, StopOnSignal
from ft.callbacks.progress import StepProgress
from ft.cli.hydra_conf import register as register_resolvers
from ft.cli.preflight import preflight
from ft.cli.schema import TARGET_KEYS, check_config, check_model
from ft.core.chatter import configure_output
from ft.core.cpuinfo import warn_cpu_precision
from ft.core.errors import ConfigError, FtError
from ft.core.integrity import RunFileError
from ft.core.signals import Interrupted, stop_at_once
from ft.data.directions import DirectionSet, load_directions
from ft.engine.module import TextualizationModule, rows_for_budget
from ft.engine.state import CheckpointRecord, FitEnded, FitResult
from ft.engine.strategy import choose_strategy, node_process_rank, shard_rows
from ft.measure.metrics import VocabFacts, evaluate, summarize, target_word_rows
from ft.measure.word_stats import logit_word_stats, stream_word_stats
from ft.model.encoder import Encoder, load_encoder
from ft.model.vocab import Vocabulary, analysis_vectors, load_or_sweep, stream_summary, sweep_bytes
from ft.rundir.kept import fingerprint
from ft.rundir.results import CONFIG, TARGETS, RunLock, atomic_write, read_config, read_summary, write_config, write_run
from ft.rundir.tracking import build_loggers, flat_config, format_table, log_summary
from ft.targets import (
    Target,
    check_word,
    direction_targets,
    group_targets,
    logit_targets,
    neuron_targets,
    number_targets,
    probe_targets,
    sae_targets,
    target_words,
    terms_targets,
    with_restarts,
)

log = logging.getLogger("ft")
register_resolvers()  # ${ft_dirname:...} in hydra.run.dir, ${ft_help:} in --help


CONFIG_DIR = str(files("ft.configs"))


class TrainingDivergedError(FtError):
    """Every target diverged: there are no results to write."""


def build_targets(cfg: DictConfig, encoder: Encoder, vocab: Vocabulary, sweep,
                  directions: DirectionSet | None = None, resumed_sae: dict | None = None) -> list[Target]:
    t = cfg.target
    if t.kind == "sae":
        return build_sae_targets(cfg, encoder, resumed_sae)
    if t.kind == "logit":
        return logit_targets(encoder, t.classes)
    if t.kind == "terms":
        return terms_targets(encoder.model, t.specs, directions)
    if t.kind == "probe":
        return probe_targets(encoder.model, t.run, t.k)
    if t.kind == "clusters":
        from ft.targets.clusters import cluster_targets

        return cluster_targets(encoder, t.num_clusters, t.point, t.layers, t.corpus, t.tokens)
    if t.kind == "direction":
        if directions is None:
            raise ConfigError("target.file=null; valid: a safetensors file with a 'directions' tensor [n, width]")
        return direction_targets(encoder.model, directions, t.site)
    if t.kind == "neuron":
        return neuron_targets(
            encoder.model, sites=t.sites, point=t.point, fraction=t.fraction,
            per_layer=t.per_layer, layers=t.layers, seed=t.seed,
        )
    if t.kind == "group":
        return group_targets(
            encoder.model, vocab, encoder.tokenizer, sweep, k=t.k, selection=t.selection,
            point=t.point, words=t.words, num_random=t.num_random,
            num_frequent=t.num_frequent, seed=t.seed,
        )
    raise ConfigError(f"target.kind={t.kind!r}; valid: {list(TARGET_KEYS)}")


def build_sae_targets(cfg: DictConfig, encoder: Encoder, resumed_sae: dict | None = None) -> list[Target]:
    """target=sae: the SAE at target.path, or the demo SAE trained for this model (target.path=null).

    `resumed_sae` (a resume of a demo-SAE run): {"copy": the run's kept copy (verified) or None,
    "sha256": the fingerprint the checkpoint's run recorded}. The kept copy is read rather than the
    cache; a demo SAE of other content than the one the earlier steps used is refused."""
    import json

    from ft.model.sites import parse_point
    from ft.targets.sae_demo import demo_sae
    from ft.targets.sae_file import CFG, load_sae

    t = cfg.target
    site = t.site or f"layer.{encoder.num_layers // 2}.resid"
    quality = None
    resumed_sae = resumed_sae or {}
    if t.path:
        sae = load_sae(t.path)
    elif resumed_sae.get("copy") is not None:  # this run's own demo SAE, not the cache's (changed since?)
        sae = load_sae(resumed_sae["copy"])
        sae.source = resumed_sae.get("source") or sae.source  # named as the run first read it (sae_path)
        quality = json.loads((Path(resumed_sae["copy"]) / CFG).read_text()).get("ft_quality")
    else:
        layer, point = parse_point(site, encoder.model)
        d = t.demo
        folder, quality = demo_sae(encoder, layer, point, corpus=d.corpus, expansion=d.expansion, l1=d.l1,
                                   steps=d.steps, lr=d.lr, seed=cfg.seed, use_cache=cfg.cache)
        sae = load_sae(folder)
        want = resumed_sae.get("sha256")
        if want and fingerprint(folder) != want:
            raise ConfigError(f"cannot resume: the demo SAE {folder} is not the one the checkpoint's run started with "
                              f"(sha256 {fingerprint(folder)[:12]}, it used {want[:12]}); valid: a new run directory "
                              "(hydra.run.dir=...), or ckpt_path=none to start over")
    targets = sae_targets(encoder.model, sae, site, t.latents, t.fraction, t.num_latents, t.seed)
    for target in targets:
        target.meta["sae_quality"] = quality
        target.meta["sae_kept"] = resumed_sae.get("copy") is not None  # already the run's kept copy
    return targets


def quiet_expected_warnings() -> None:
    """Silence Lightning warnings that describe ft's design, not a problem."""
    for message in (".*module\\(s\\) in eval mode.*", ".*ModelCheckpoint with manual optimization.*",
                    ".*isinstance\\(treespec, LeafSpec\\).*", ".*smaller than the logging interval.*"):
        warnings.filterwarnings("ignore", message=message)


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
    if cfg.input.get("kind") == "tokens":  # the search's members, at each fluency weight, are restarts too
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
    if cfg.input.kind == "tokens":
        return build_search_module(cfg, encoder, targets, facts)
    optimizer = instantiate(cfg.optim)
    extra = {"allowed": facts.vocab.ids} if cfg.input.kind == "projected" else {}  # PEZ projects onto words
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


# What a resumed run may change: how long it runs, where and how it reports, how it slices the
# work. Anything else (the model, targets, input, optimizer, regularizers, seeds, precision,
# convergence rule) must equal the run directory's config.yaml.
RESUME_MAY_CHANGE = ("trainer.max_steps", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
                     "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
                     "logger", "callbacks", "print_rows", "log_level", "cache", "run_name", "tags", "ckpt_path",
                     "examples_after_run", "optimized_metric",
                     "experiment_name", "engine.checkpoint_every_n_steps", "engine.chunk_size",
                     "engine.memory_budget_mb", "engine.fast_forward", "engine.stop_when_converged",
                     "engine.sweep_budget_mb", "hydra")
# keys a run directory made before them lacks
RESUME_DEFAULTS = {"engine.keep": "last", "log_level": "info", "examples_after_run": False, "search.topk": 256,
                   "search.candidates": 256, "search.population": 1, "search.patience": 40,
                   "search.fluency_weights": [0], "search.fluency_model": "auto"}
RESUME_LOG = "resume_log.jsonl"
IDENTITY = ("model.name_or_path", "input.kind", "target.kind")  # named first when a checkpoint is foreign


def resume_changes(old: DictConfig | dict, new: DictConfig, path: Path, maker: str | None = None) -> dict[str, list]:
    """The allowed changes of a resumed run ({key: [old, new]}); a change of any other key is a
    ConfigError naming the key, both values and (`maker`) what made the checkpoint."""
    a, b = flat_config(old), flat_config(new)
    changed = {}
    for key in sorted(set(a) | set(b), key=lambda k: (k not in IDENTITY, k)):  # what a run is, first
        va, vb = a.get(key, RESUME_DEFAULTS.get(key)), b.get(key, RESUME_DEFAULTS.get(key))
        if va == vb:
            continue
        if key.startswith(RESUME_MAY_CHANGE):
            changed[key] = [va, vb]
            continue
        by = f" (made by {maker})" if maker else ""
        raise ConfigError(f"cannot resume {path}{by}: it was made with {key}={va!r}, this run has {key}={vb!r}; "
                          f"valid: {key}={va!r}, a new run directory (hydra.run.dir=...), or ckpt_path=none "
                          "to start over")
    return changed


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's dict (tensors memory-mapped); a truncated or damaged file is a one-line
    error naming it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError, OSError, EOFError, pickle errors...
        cause = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ConfigError(f"checkpoint {path} is unreadable ({cause}): it was cut short or damaged; valid: "
                          f"delete it to start over, or ckpt_path=none") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"checkpoint {path} is not a Lightning checkpoint (a {type(ckpt).__name__}); valid: a "
                          "checkpoints/last.ckpt that ft wrote, or ckpt_path=none")
    return ckpt


def read_checkpoint_step(path: Path) -> int:
    """The checkpoint's global step; a truncated or damaged file is a one-line error naming it."""
    return int(read_checkpoint(path).get("global_step", 0))


def made_by(cfg: DictConfig | dict) -> str:
    """One line naming what a run is: its input, its targets and its model."""
    c = flat_config(cfg)
    return (f"input={c.get('input.kind')} target={c.get('target.kind')} model={c.get('model.name_or_path')} "
            f"seed={c.get('seed')}")


def checkpoint_origin(path: Path, ckpt: dict) -> tuple[dict | DictConfig, dict[str, dict], str]:
    """What made a checkpoint: its settings, its input fingerprints and a line naming it, from the
    record stored inside it (`ft.engine.state.CheckpointRecord`), else from the config.yaml of the run
    directory it lies in (checkpoints written before the record). Neither: a ConfigError."""
    from ft.engine.state import CheckpointRecord
    from ft.rundir.kept import index

    record = ckpt.get(CheckpointRecord.KEY)
    if isinstance(record, dict) and isinstance(record.get("settings"), dict):
        return record["settings"], dict(record.get("inputs") or {}), str(record.get("made_by"))
    origin = path.parent.parent
    if (origin / CONFIG).exists():
        old = OmegaConf.load(origin / CONFIG)
        return old, index(origin), made_by(old)
    raise ConfigError(f"checkpoint {path} records no settings and lies outside a run directory (no "
                      f"{origin / CONFIG}): ft cannot check what made it; valid: a checkpoint in its run directory "
                      "(RUN/checkpoints/last.ckpt), or ckpt_path=none to start over")


def refuse_changed_inputs(path: Path, recorded: dict[str, dict], digests: dict[str, str],
                          sources: dict[str, Path]) -> None:
    """A ConfigError naming the first input file whose content differs from the one the
    checkpoint's run started with (same path or not)."""
    for role, digest in digests.items():
        old = (recorded.get(role) or {}).get("sha256")
        if old and old != digest:
            raise ConfigError(f"cannot resume from {path}: {role} {sources[role]} is not the one that run started "
                              f"with (sha256 {digest[:12]}, it used {old[:12]}); valid: restore that file, a new run "
                              "directory (hydra.run.dir=...), or ckpt_path=none to start over")


def checkpoint_to_resume(cfg: DictConfig, run_dir: Path, digests: dict[str, str] | None = None,
                         sources: dict[str, Path] | None = None) -> tuple[Path | None, dict]:
    """`ckpt_path`: auto (last.ckpt when the run directory has one), last (required), none, or a path.

    Returns the checkpoint and what to record in resume_log.jsonl ({at_step, changed: {key: [old,
    new]}, from: a checkpoint of another run directory}; {} when nothing is worth recording).
    Refuses, before anything is written, a checkpoint that cannot be read, one made with other
    settings (its own record, wherever it lies), and one whose run read other input files
    (`digests`: role -> sha256 of the files this run reads, `sources`: their paths).
    """
    last = run_dir / "checkpoints" / "last.ckpt"
    choice = str(cfg.get("ckpt_path", "auto"))
    if choice == "none":
        return None, {}
    path = last if choice in ("auto", "last") else Path(choice)
    if not path.exists():
        if choice == "auto":
            return None, {}
        raise ConfigError(f"ckpt_path={choice!r}: {path} does not exist; valid: auto, last, none, a .ckpt file")
    ckpt = read_checkpoint(path)
    settings, inputs, maker = checkpoint_origin(path, ckpt)
    changed = resume_changes(settings, cfg, path, maker)
    refuse_changed_inputs(path, inputs, digests or {}, sources or {})
    entry: dict = {"at_step": int(ckpt.get("global_step", 0))}
    if changed:
        entry["changed"] = changed
    if path.resolve().parent.parent != run_dir.resolve():
        entry["from"] = str(path.resolve())
    return path, entry if len(entry) > 1 else {}


def record_resume(run_dir: Path, entry: dict) -> None:
    """Append what a resume changed to resume_log.jsonl (config.yaml then holds the new values)."""
    import json
    import time

    path = run_dir / RESUME_LOG
    old = path.read_text() if path.exists() else ""
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **entry}, default=str)
    atomic_write(path, lambda p: p.write_text(old + line + "\n"))


def finished_step(cfg: DictConfig, run_dir: Path) -> int | None:
    """The step a finished run in `run_dir` reached when this run would add nothing to it (its
    intact results reached `trainer.max_steps`, or every row stopped before it); else None."""
    from ft.core.integrity import read_manifest, read_run_record, verify

    if str(cfg.get("ckpt_path", "auto")) not in ("auto", "last"):
        return None
    try:
        files = read_manifest(run_dir)
        if files is None or TARGETS not in files:  # no results, or retired by a start-over
            return None
        for name in files:
            verify(run_dir, name)
        record = read_run_record(run_dir)
    except RunFileError:
        return None  # damaged results: the run resumes and writes them again
    if record is None:  # results from before ft recorded the step: the checkpoint's
        last = run_dir / "checkpoints" / "last.ckpt"
        step = read_checkpoint_step(last) if last.exists() else None
        return step if step is not None and step >= cfg.trainer.max_steps else None
    step = int(record["step"])
    if step >= cfg.trainer.max_steps or record.get("stopped_early") and cfg.engine.stop_when_converged:
        return step
    return None


def input_sources(cfg: DictConfig) -> dict[str, Path]:
    """The local files and folders this run reads (role -> path), which it keeps (`ft.rundir.kept`): the
    model folder (by fingerprint), a directions file, an SAE folder, a probe run's table and
    concept file, a fluency model or corpus, a clusters corpus. Hub names are not files."""
    from ft.model.encoder import local_folder

    t, out = cfg.target, {}
    try:
        folder = local_folder(cfg.model.name_or_path)  # a hub name: the cache's snapshot it resolves to
        if folder is not None:
            out["model"] = folder
    except FtError:
        pass  # the packaged model's package is missing: load_encoder says so
    if t.get("file"):
        out["directions"] = Path(str(t.file))
    if t.kind == "sae" and t.get("path"):
        out["sae"] = Path(str(t.path))
    if t.kind == "probe" and t.get("run"):
        out["probe"] = Path(str(t.run)) / "probe.parquet"
        concept = probe_concept(Path(str(t.run)))
        if concept is not None:
            out["concept"] = concept
    if t.kind == "clusters" and isinstance(t.get("corpus"), str):
        out["corpus"] = corpus_path(t.corpus)
    if cfg.input.get("kind") == "tokens":
        spec = str(cfg.search.get("fluency_model", "auto"))
        if spec.startswith("bigram:"):
            out["fluency_corpus"] = corpus_path(spec.split(":", 1)[1])
        elif spec not in ("auto", "self", "bigram"):
            out["fluency_model"] = Path(spec)
    return {role: p.expanduser() for role, p in out.items() if p.expanduser().exists()}


def corpus_path(spec: str) -> Path:
    """The file or folder a corpus spec reads (ft.data.corpus): hf:PATH[:COLUMN]'s PATH, else the spec
    itself (a file name may hold a colon)."""
    return Path(spec[3:].split(":")[0]) if spec.startswith("hf:") else Path(spec)


def probe_concept(probe_run: Path) -> Path | None:
    """The concept file of an ft.probe run: its kept copy (verified; the file it read), or for a
    probe run from before ft kept inputs the path in its config (None for a builtin concept or an
    unreadable run)."""
    from ft.rundir.kept import kept

    copy = kept(probe_run, "concept") if (probe_run / CONFIG).is_file() else None
    if copy is not None:
        return copy
    try:
        concept = OmegaConf.load(probe_run / CONFIG).get("concept")
    except Exception:  # no run there, or not YAML: probe_targets names the problem
        return None
    return Path(concept) if isinstance(concept, str) and Path(concept).is_file() else None


def resumed_demo_sae(cfg: DictConfig, run_dir: Path, resume_from: Path | None) -> dict | None:
    """A resumed demo-SAE run: the demo SAE its checkpoint's run kept ({"copy", "sha256"}), else None."""
    from ft.rundir.kept import index, kept

    if resume_from is None or cfg.target.kind != "sae" or cfg.target.get("path"):
        return None
    recorded = (checkpoint_origin(resume_from, read_checkpoint(resume_from))[1].get("sae") or {}).get("sha256")
    own = resume_from.resolve().parent.parent == run_dir.resolve()
    copy = kept(run_dir, "sae") if own else None
    if copy is not None and recorded and fingerprint(copy) != recorded:
        copy = None  # kept for another attempt: the cache's demo SAE is checked against the record instead
    source = (index(run_dir).get("sae") or {}).get("source") if copy is not None else None
    return {"copy": copy, "sha256": recorded, "source": source}


def keep_inputs(run_dir: Path, cfg: DictConfig, sources: dict[str, Path], digests: dict[str, str],
                targets: list[Target], fresh: bool) -> dict[str, dict]:
    """Keep every input in the run (`ft.rundir.kept`), the demo SAE too; a `fresh` start forgets the inputs
    an earlier run in this directory kept and this one does not read. Returns the kept index."""
    from ft.rundir.kept import forget, index, keep

    for role, path in sources.items():
        keep(run_dir, role, path, digest=digests[role])
    sae = targets[0].meta.get("sae") if targets else None
    if cfg.target.kind == "sae" and "sae" not in sources and sae is not None and not targets[0].meta.get("sae_kept"):
        keep(run_dir, "sae", sae.source)
    if fresh:
        forget(run_dir, set(index(run_dir)) - set(sources) - ({"sae"} if cfg.target.kind == "sae" else set()))
    return index(run_dir)


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
    t = cfg.target
    if t.kind == "group":  # groups are selected from the sweep of target.point
        if streamed(t.point):
            words = target_words(vocab, t.words, t.num_random, t.num_frequent, t.seed)
            rows = [check_word(w, vocab, encoder.tokenizer) for w in words]
            log.info("vocabulary table of %s too large for engine.sweep_budget_mb=%s: streaming it", t.point,
                     cfg.engine.get("sweep_budget_mb", 2048))
            source = stream_summary(encoder, vocab, t.point, rows)
        else:
            source = sweep_of(t.point)
    targets = select_targets(cfg, build_targets(cfg, encoder, vocab, source, directions, resumed_sae))
    used = sorted({s.point for t in targets for s in t.sites})  # sites may mix points
    vectors = analysis_vectors(encoder, vocab, cfg.position)
    if t.kind == "logit":  # no sites: every word through the classifier
        return targets, VocabFacts(vocab, vectors, logit_word_stats(encoder, vocab, [t.readout for t in targets]))
    if any(streamed(p) for p in used):
        words = stream_word_stats(encoder, vocab, [t.readout for t in targets], target_word_rows(vocab, targets))
        return targets, VocabFacts(vocab, vectors, words)
    facts = VocabFacts.build(vocab, vectors, {p: sweep_of(p) for p in used}, encoder.model, targets)
    return targets, facts  # the sweeps (~1 GB each for bert-base) go out of scope here


def run(cfg: DictConfig, run_dir: str | Path, encoder: Encoder | None = None) -> dict[str, float]:
    """Textualize the targets of `cfg`; write the run directory; return the summary metrics.

    A run directory that holds a checkpoint resumes from it (`ckpt_path=auto`), W&B run included.
    """
    run_dir = Path(run_dir)
    check_config(cfg)
    configure_output(cfg.get("log_level", "info"))
    warn_cpu_precision(cfg.trainer)  # bf16 on a CPU without bf16 units: slower than fp32
    quiet_expected_warnings()
    sources = input_sources(cfg)
    digests = {role: fingerprint(path) for role, path in sources.items()}
    resume_from, resume_entry = checkpoint_to_resume(cfg, run_dir, digests, sources)
    done = finished_step(cfg, run_dir)
    if done is not None:  # a finished run: its results stand, byte for byte
        if resume_from is None:
            resume_changes(read_config(run_dir), cfg, run_dir)
        print(f"run already finished: {run_dir} ({done} steps); nothing to do")
        return read_summary(run_dir)
    pl.seed_everything(cfg.seed, verbose=False)
    with stop_at_once("loading the model and building the targets"):  # a signal here: one line, 143/130
        encoder = encoder or load_encoder(cfg.model.name_or_path, cfg.model.trust_remote_code)
        check_model(cfg, encoder.model.config)
        directions = load_directions(cfg.target.file) if cfg.target.get("file") else None
        targets, facts = prepare_targets(cfg, encoder, directions, resumed_demo_sae(cfg, run_dir, resume_from))
        module = build_module(cfg, encoder, targets, facts)
        module.facts = facts
    node_rank = node_process_rank(cfg.trainer)
    if node_rank is not None:  # Lightning's rank-zero guards read this before the Trainer exists
        pl.utilities.rank_zero_only.rank = node_rank
    rank0 = pl.utilities.rank_zero_only.rank == 0
    with RunLock(run_dir) if rank0 else nullcontext():
        with stop_at_once("starting the run"):  # the config, kept inputs, loggers: a signal stops here at once
            if rank0:
                # a start over, or a checkpoint of another run directory: what this directory holds (results,
                # checkpoints, resume log, kept inputs) is another run's, retired before anything else is written
                fresh = resume_from is None or resume_from.resolve().parent.parent != run_dir.resolve()
                write_config(run_dir, cfg, fresh=fresh)
                if fresh:
                    for old in (run_dir / "checkpoints").glob("*.ckpt"):
                        if resume_from is None or old.resolve() != resume_from.resolve():
                            old.unlink()
                    (run_dir / RESUME_LOG).unlink(missing_ok=True)
                    from ft.rundir.tracking import WANDB_ID

                    (run_dir / WANDB_ID).unlink(missing_ok=True)  # another run: a new W&B run, not the old one's
                kept_inputs = keep_inputs(run_dir, cfg, sources, digests, targets, fresh=fresh)
                if resume_entry:
                    record_resume(run_dir, resume_entry)
            loggers = build_loggers(cfg, run_dir, cfg.run_name or cfg.experiment_name)
            # the control first: a step's rows are decided before any other callback (a checkpoint) sees it
            callbacks = [module.control, *(instantiate(c) for c in cfg.callbacks.values() if c is not None)]
            callbacks.append(CheckpointRecord(OmegaConf.to_container(cfg, resolve=True),
                                              kept_inputs if rank0 else {}, made_by(cfg)))
            callbacks.append(AtomicCheckpoint(
                dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=0,
                every_n_train_steps=cfg.engine.checkpoint_every_n_steps,
            ))
            stop, ended = StopOnSignal(run_dir / "checkpoints" / "last.ckpt"), FitEnded()
            callbacks += [stop, ended]
            if cfg.trainer.get("enable_progress_bar", True):
                callbacks.append(StepProgress())
            trainer: pl.Trainer = instantiate(
                cfg.trainer, logger=loggers, callbacks=callbacks, default_root_dir=str(run_dir),
                strategy=choose_strategy(cfg.trainer),
            )
        copies = len(targets) // max(1, len({t.target_id for t in targets}))
        log.info("textualizing %d %s targets (x%d rows each) for up to %d steps%s",
                 len(targets) // copies, "/".join(sorted({t.kind for t in targets})), copies,
                 cfg.trainer.max_steps, f", resuming from {resume_from}" if resume_from else "")
        with stop.installed():
            trainer.fit(module, ckpt_path=str(resume_from) if resume_from else None)
        if not ended.ended:  # resumed with no steps left: Lightning skipped the fit, its end included
            module.on_train_end()
        if not trainer.is_global_zero:
            return {}
        result = module.result(facts.vocab.ids)
        every, tensors = evaluate(result, targets, facts, encoder, cfg.position, cfg.engine.runaway_factor)
        frontier = frontier_table(every) if "fluency" in every else None
        df, tensors = best_restarts(every, tensors)
        if df["diverged"].all():
            raise TrainingDivergedError(
                f"all {len(df)} targets diverged (non-finite or runaway input) at optim.lr="
                f"{cfg.optim.get('lr')}; lower the learning rate. No results were written.")
        summary = summarize(df)
        summary["final/word_analysis_norm_mean"] = float(facts.word_vectors.norm(dim=-1).mean())
        if "static_promotes" in df:  # single units: is the most activating word among the static tokens?
            from ft.model.static import agreement

            summary["final/static_maw_agreement"] = agreement(df)
        if cfg.target.kind == "probe":  # how much of the textualization is the probe's concept
            from ft.measure.probe import concept_scores

            summary.update(concept_scores(df, cfg.target.run, encoder.tokenizer, run_dir))
        if cfg.target.kind == "clusters":  # the clustering's own quality over its corpus
            summary |= {"clusters/count": len(targets), "clusters/within_corr": targets[0].meta["cluster_within"],
                        "clusters/between_corr": targets[0].meta["cluster_between"]}
        if "fluency" in df:  # input=tokens: the kept texts' fluency (ft.measure.fluency, nats/token)
            summary["final/fluency_mean"] = float(df["fluency"].mean())
        quality = targets[0].meta.get("sae_quality")
        if quality:  # the demo SAE's own quality, on held-out corpus tokens
            summary.update({f"sae/{k}": float(v) for k, v in quality.items()})
        record = {"step": result.total_steps, "stopped_early": result.total_steps < cfg.trainer.max_steps}
        write_run(run_dir, cfg, df, tensors, summary, curve_table(result, targets, df), directions, frontier, record)
        note = log_summary(loggers, summary, df, result.total_steps, run_dir)
    if cfg.get("examples_after_run") and rank0:
        from ft.measure.examples import run_examples

        run_examples(run_dir, substitutes=0)
    print(format_table(df, cfg.print_rows, summary))
    print(f"run directory: {run_dir}")
    if note:
        print(note)
    return summary


def run_name_from_overrides(experiment: str, overrides: list[str]) -> str:
    keys = [o for o in overrides if not o.startswith(("experiment=", "hydra", "+hydra"))]
    return "-".join([experiment, *keys])[:128]


def optimized_value(cfg: DictConfig, summary: dict[str, float]) -> float | None:
    """The summary's `optimized_metric` (None when unset or on a non-zero rank); ConfigError naming
    the valid keys when the summary has no such metric."""
    name = cfg.get("optimized_metric")
    if not name or not summary:
        return None
    if name not in summary:
        keys = ", ".join(sorted(k for k, v in summary.items() if isinstance(v, (int, float))))
        raise ConfigError(f"optimized_metric={name!r} is not in the run's summary; valid: {keys}")
    return float(summary[name])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """One run; returns its `optimized_metric`, which Hydra's optimizing sweepers (Optuna) read."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    if cfg.run_name is None:
        with open_dict(cfg):
            cfg.run_name = run_name_from_overrides(cfg.experiment_name, list(hc.overrides.task))
    from hydra.types import RunMode

    from ft.cli.preflight import NothingToDo

    try:
        finished = finished_step(cfg, Path(hc.runtime.output_dir)) is not None
        value = optimized_value(cfg, run(cfg, hc.runtime.output_dir))
    except FtError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        from ft.core.signals import resume_command

        again = resume_command("ft.train", list(hc.overrides.task), hc.runtime.output_dir)
        print(f"interrupted: {e}; resume with: {again}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:  # a full disk, a read-only folder: one line, the path, the cause, what to do
        from ft.cli.preflight import storage_line

        print(f"error: {storage_line(e, hc.runtime.output_dir)}", file=sys.stderr)
        sys.exit(1)
    if finished and hc.mode != RunMode.MULTIRUN:  # a finished run re-run: Hydra's own files put back too
        raise NothingToDo()
    return value


def cli() -> None:
    """The `ft-train` console script (and `python -m ft.train`): checks, then Hydra."""
    from ft.cli.preflight import nothing_left_if_refused
    from ft.core.signals import jobs_stop_with_launcher

    preflight(sys.argv[1:])  # one-line errors (exit 2) before Hydra writes anything
    logging.raiseExceptions = False  # a library's log file on a full disk: no "--- Logging error ---" traceback
    with nothing_left_if_refused(sys.argv[1:]), jobs_stop_with_launcher(sys.argv[1:]):  # (SIGTERM: the jobs too)
        main()


if __name__ == "__main__":
    cli()
