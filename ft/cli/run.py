"""One textualization run, `run(cfg, run_dir)`: check the config, resume or start, build the
targets and the module, fit with the Lightning Trainer, measure, write the run directory and print
the table. `ft.train` (the Hydra command), `ft.api` and `ft.compare` call it.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import nullcontext
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ft.callbacks.checkpoint import AtomicCheckpoint, StopOnSignal
from ft.callbacks.progress import StepProgress
from ft.cli.build import best_restarts, build_module, curve_table, frontier_table, prepare_targets
from ft.cli.resume import (
    RESUME_LOG,
    checkpoint_to_resume,
    finished_step,
    input_sources,
    keep_inputs,
    made_by,
    record_resume,
    resume_changes,
    resumed_demo_sae,
)
from ft.cli.schema import check_config, check_model
from ft.core.chatter import configure_output
from ft.core.cpuinfo import warn_cpu_precision
from ft.core.errors import ConfigError, FtError
from ft.core.signals import stop_at_once
from ft.data.directions import load_directions
from ft.engine.state import CheckpointRecord, FitEnded
from ft.engine.strategy import choose_strategy, node_process_rank
from ft.measure.metrics import evaluate, summarize
from ft.model.encoder import Encoder, load_encoder
from ft.rundir.kept import fingerprint
from ft.rundir.results import RunLock, read_config, read_summary, write_config, write_run
from ft.rundir.tracking import build_loggers, format_table, log_summary
from ft.targets.registry import SummaryContext, unit_kind

log = logging.getLogger("ft")


class TrainingDivergedError(FtError):
    """Every target diverged: there are no results to write."""


def quiet_expected_warnings() -> None:
    """Silence Lightning warnings that describe ft's design, not a problem."""
    for message in (".*module\\(s\\) in eval mode.*", ".*ModelCheckpoint with manual optimization.*",
                    ".*isinstance\\(treespec, LeafSpec\\).*", ".*smaller than the logging interval.*"):
        warnings.filterwarnings("ignore", message=message)


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
        summary |= unit_kind(cfg.target.kind).summary(SummaryContext(cfg, df, targets, encoder, run_dir))
        if "fluency" in df:  # input=tokens: the kept texts' fluency (ft.measure.fluency, nats/token)
            summary["final/fluency_mean"] = float(df["fluency"].mean())
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
