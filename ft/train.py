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
from pytorch_lightning.callbacks import ModelCheckpoint

from ft.callbacks.progress import StepProgress
from ft.chatter import configure_output
from ft.encoder import Encoder, load_encoder
from ft.errors import ConfigError, FtError
from ft.metrics import VocabFacts, evaluate, summarize
from ft.module import TextualizationModule, rows_for_budget
from ft.preflight import preflight
from ft.results import CONFIG, RunLock, write_config, write_run
from ft.schema import check_config, check_model
from ft.strategy import choose_strategy, shard_rows
from ft.targets import Target, group_targets, neuron_targets, number_targets, with_restarts
from ft.tracking import build_loggers, format_table, log_summary
from ft.vocab import Vocabulary, analysis_vectors, load_or_sweep

log = logging.getLogger("ft")


CONFIG_DIR = str(files("ft.configs"))


class TrainingDivergedError(FtError):
    """Every target diverged: there are no results to write."""


def build_targets(cfg: DictConfig, encoder: Encoder, vocab: Vocabulary, sweep) -> list[Target]:
    t = cfg.target
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
    raise ConfigError(f"target.kind={t.kind!r}; valid: ['neuron', 'group']")


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
    return with_restarts(targets[shard_rows(len(targets), shard, num)], cfg.engine.restarts)


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


def curve_table(module: TextualizationModule, targets: list[Target], kept: pd.DataFrame
                ) -> pd.DataFrame:
    """Per-target activation curves of the kept rows (best restarts), in long format."""
    values = module.curves()  # [samples, rows]
    keep = {(t, r) for t, r in zip(kept["target_id"], kept["restart"], strict=True)}
    cols = [i for i, tg in enumerate(targets) if (tg.target_id, tg.restart) in keep]
    steps = torch.tensor(module.curve_steps).repeat_interleave(len(cols))
    ids = torch.tensor([targets[i].target_id for i in cols]).repeat(len(module.curve_steps))
    return pd.DataFrame({"step": steps.numpy(), "target_id": ids.numpy(),
                         "objective": values[:, cols].flatten().numpy()})


def build_module(cfg: DictConfig, encoder: Encoder, targets: list[Target],
                 facts: VocabFacts) -> TextualizationModule:
    optimizer = instantiate(cfg.optim)
    inputs = instantiate(cfg.input)(
        target_ids=[t.init_id for t in targets], word_embeddings=encoder.word_embeddings,
        seed=cfg.seed, optimizer=optimizer,
    )
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    e = cfg.engine
    chunk = e.chunk_size
    if chunk == "auto":  # rows per chunk from the memory budget (literal one-hot rows count too)
        row = inputs.param[0].numel() if inputs.param.shape[-1] != encoder.hidden_size else 0
        chunk = rows_for_budget(encoder.model.config, cfg.input.length, e.memory_budget_mb, row)
    elif not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"engine.chunk_size={chunk!r}; valid: auto or an integer >= 1")
    fast_choices, fast = {"auto": None, True: True, False: False}, e.get("fast_forward", "auto")
    if fast not in fast_choices:
        raise ConfigError(f"engine.fast_forward={fast!r}; valid: auto, true, false")
    fast = fast_choices[fast]
    return TextualizationModule(
        encoder.model, [t.sites for t in targets], inputs, optimizer,
        cls_id=facts.vocab.cls_id, sep_id=facts.vocab.sep_id, position=cfg.position,
        chunk_size=chunk, converge_window=e.converge_window, converge_tol=e.converge_tol,
        stop_when_converged=e.stop_when_converged, freeze_converged=e.freeze_converged,
        scheduler=scheduler, reg_norm=cfg.reg.norm, reg_word=cfg.reg.word,
        word_vectors=facts.word_vectors, curve_every=e.curve_every, fast_forward=fast,
        keep=e.get("keep", "last"),
    )


SAME_RUN_KEYS = ("model.name_or_path", "target", "input.kind", "input.length", "position", "seed",
                 "engine.restarts", "engine.keep")
SAME_RUN_DEFAULTS = {"engine.keep": "last"}  # what a run directory made before the key existed had


def checkpoint_to_resume(cfg: DictConfig, run_dir: Path) -> Path | None:
    """`ckpt_path`: auto (last.ckpt when the run directory has one), last (required), none, or a path.

    Refuses a checkpoint whose run directory was made for another model or other targets.
    """
    last = run_dir / "checkpoints" / "last.ckpt"
    choice = str(cfg.get("ckpt_path", "auto"))
    if choice == "none":
        return None
    path = last if choice in ("auto", "last") else Path(choice)
    if not path.exists():
        if choice == "auto":
            return None
        raise ConfigError(f"ckpt_path={choice!r}: {path} does not exist; valid: auto, last, none, a .ckpt file")
    old_file = path.parent.parent / CONFIG
    if old_file.exists():
        old = OmegaConf.load(old_file)
        for key in SAME_RUN_KEYS:
            a, b = (OmegaConf.select(c, key, default=SAME_RUN_DEFAULTS.get(key)) for c in (old, cfg))
            if a != b:
                raise ConfigError(f"checkpoint {path} was made with {key}={a}, this run has {key}={b}; "
                                  "it belongs to another run: use a new hydra.run.dir or ckpt_path=none")
    return path


def prepare_targets(cfg: DictConfig, encoder: Encoder) -> tuple[list[Target], VocabFacts]:
    """This run's targets (numbered, sharded, restarts repeated) and the vocabulary facts they are
    measured against: the sweep of every point their sites use, the analysis vectors at `position`."""
    vocab = Vocabulary.from_tokenizer(encoder.tokenizer)
    sweeps: dict[str, torch.Tensor] = {}  # point -> vocabulary sweep, each computed (or read) once

    def sweep_of(point: str) -> torch.Tensor:
        if point not in sweeps:
            sweeps[point] = load_or_sweep(encoder, vocab, point, position=1, use_cache=cfg.cache)
        return sweeps[point]

    groups = cfg.target.kind == "group"  # groups are selected from the sweep of target.point
    targets = select_targets(cfg, build_targets(cfg, encoder, vocab, sweep_of(cfg.target.point) if groups else None))
    used = sorted({s.point for t in targets for s in t.sites})  # sites may mix points
    facts = VocabFacts.build(vocab, analysis_vectors(encoder, vocab, cfg.position), {p: sweep_of(p) for p in used},
                             encoder.model, targets)
    return targets, facts  # the sweeps (~1 GB each for bert-base) go out of scope here


def run(cfg: DictConfig, run_dir: str | Path, encoder: Encoder | None = None) -> dict[str, float]:
    """Textualize the targets of `cfg`; write the run directory; return the summary metrics.

    A run directory that holds a checkpoint resumes from it (`ckpt_path=auto`), W&B run included.
    """
    run_dir = Path(run_dir)
    check_config(cfg)
    configure_output(cfg.get("log_level", "info"))
    quiet_expected_warnings()
    resume_from = checkpoint_to_resume(cfg, run_dir)
    pl.seed_everything(cfg.seed, verbose=False)
    encoder = encoder or load_encoder(cfg.model.name_or_path, cfg.model.trust_remote_code)
    check_model(cfg, encoder.model.config)
    targets, facts = prepare_targets(cfg, encoder)
    module = build_module(cfg, encoder, targets, facts)
    module.facts = facts
    rank0 = pl.utilities.rank_zero_only.rank == 0
    with RunLock(run_dir) if rank0 else nullcontext():
        if rank0:
            write_config(run_dir, cfg)
        loggers = build_loggers(cfg, run_dir, cfg.run_name or cfg.experiment_name)
        callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
        callbacks.append(ModelCheckpoint(
            dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=0,
            every_n_train_steps=cfg.engine.checkpoint_every_n_steps,
        ))
        if cfg.trainer.get("enable_progress_bar", True):
            callbacks.append(StepProgress())
        trainer: pl.Trainer = instantiate(
            cfg.trainer, logger=loggers, callbacks=callbacks, default_root_dir=str(run_dir),
            strategy=choose_strategy(cfg.trainer),
        )
        log.info("textualizing %d %s targets (x%d restarts) for up to %d steps%s",
                 len(targets) // cfg.engine.restarts, cfg.target.kind, cfg.engine.restarts,
                 cfg.trainer.max_steps, f", resuming from {resume_from}" if resume_from else "")
        trainer.fit(module, ckpt_path=str(resume_from) if resume_from else None)
        if not trainer.is_global_zero:
            return {}
        df, tensors = best_restarts(*evaluate(module, targets, facts, cfg.engine.runaway_factor))
        if df["diverged"].all():
            raise TrainingDivergedError(
                f"all {len(df)} targets diverged (non-finite or runaway input) at optim.lr="
                f"{cfg.optim.get('lr')}; lower the learning rate. No results were written.")
        summary = summarize(df)
        summary["final/word_analysis_norm_mean"] = float(facts.word_vectors.norm(dim=-1).mean())
        write_run(run_dir, cfg, df, tensors, summary, curve_table(module, targets, df))
        note = log_summary(loggers, summary, df, int(module.steps_done), run_dir)
    print(format_table(df, cfg.print_rows, summary))
    print(f"run directory: {run_dir}")
    if note:
        print(note)
    return summary


def run_name_from_overrides(experiment: str, overrides: list[str]) -> str:
    keys = [o for o in overrides if not o.startswith(("experiment=", "hydra", "+hydra"))]
    return "-".join([experiment, *keys])[:128]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    if cfg.run_name is None:
        with open_dict(cfg):
            cfg.run_name = run_name_from_overrides(cfg.experiment_name, list(hc.overrides.task))
    try:
        run(cfg, hc.runtime.output_dir)
    except FtError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    preflight(sys.argv[1:])  # one-line errors (exit 2) before Hydra writes anything
    main()
