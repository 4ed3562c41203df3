"""Experiment tracking: the CSV and W&B loggers of a run, its summary, tables and artifact."""

from __future__ import annotations

import netrc
import os
import time
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger

from ft.rundir.results import CONFIG, FRONTIER, INPUTS, TARGETS, atomic_write, read_frontier, target_label

WANDB_ID = "wandb_id"  # file in the run directory: a resumed run continues the same W&B run


def wandb_mode(requested: str) -> str:
    """auto -> WANDB_MODE if set, online when an API key is available, else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_logged_in() else "offline"


def wandb_logged_in() -> bool:
    """An API key in the environment or in ~/.netrc for the W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def start_wandb(logger: WandbLogger, wait_s: float = 60.0) -> object:
    """Start (or resume) the W&B run. After a crash, the killed run's W&B service may hold its
    id for a few seconds ("run ID ... is in use"): wait for it instead of failing the resume."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return logger.experiment
        except Exception as e:  # wandb raises its own error types through several layers
            if "in use" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def flat_config(cfg: DictConfig | dict) -> dict[str, object]:
    """{"optim.lr": 0.1, "input.kind": "embedding", ...}: every leaf under its dotted key."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: dict[str, object] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(c, "")
    return out


def build_loggers(cfg: DictConfig, run_dir: Path, run_name: str) -> list[Logger]:
    """CSV + W&B loggers; the W&B run id is kept in the run directory so a resume continues it."""
    loggers: list[Logger] = []
    lcfg = OmegaConf.to_container(cfg.logger, resolve=True)
    if lcfg.get("csv"):
        loggers.append(instantiate(lcfg["csv"], save_dir=str(run_dir)))
    wcfg = lcfg.get("wandb")
    if wcfg:
        mode = wandb_mode(wcfg.pop("mode", "auto"))
        if mode != "disabled":
            id_file = run_dir / WANDB_ID
            run_id = id_file.read_text().strip() if id_file.exists() else None
            wandb_logger = instantiate(
                wcfg, save_dir=str(run_dir), name=run_name, offline=mode == "offline",
                id=run_id, resume="allow" if run_id else None,
            )
            if wandb_logger._wandb_init.get("anonymous", 0) is None:  # Lightning passes it; wandb warns on it
                del wandb_logger._wandb_init["anonymous"]
            if pl.utilities.rank_zero_only.rank == 0:
                experiment = start_wandb(wandb_logger)
                # flat, dotted keys: a sweep agent locks the keys it sweeps ("input" when it sweeps the
                # group), which would drop a nested {"input": {...}} update whole; "input.kind" arrives
                wandb_logger.log_hyperparams(flat_config(cfg))
                atomic_write(id_file, lambda p: p.write_text(experiment.id))
            loggers.append(wandb_logger)
    return loggers


def wandb_note(lg: WandbLogger) -> str:
    """Where the W&B run is: its URL, or the offline folder and how to upload it."""
    exp = lg.experiment
    url = getattr(exp, "url", None)
    if url:
        return f"W&B run: {url}"
    folder = Path(exp.dir).parent
    return f"W&B run (offline): {folder}; upload with `wandb sync {folder}`"


def log_summary(loggers: list[Logger], summary: dict[str, float], df: pd.DataFrame,
                step: int, run_dir: Path) -> str:
    """Log the summary and tables, finish the loggers; returns the line saying where W&B's run is."""
    note = ""
    for lg in loggers:
        lg.log_metrics(summary, step=step)
        if isinstance(lg, WandbLogger):
            lg.experiment.summary.update(summary)
            lg.log_table("results/targets", dataframe=wandb_targets_table(df))
            if "text" in df:  # input=tokens: the searched texts
                cols = ["target_id", "sites", "text", "objective", "most_activating_word",
                        "most_activating_word_activation", "retokenizes", "fluency", "fluency_weight"]
                texts = df[[c for c in cols if c in df]].head(1000).copy()
                texts["sites"] = texts["sites"].map(lambda s: " ".join(s[:5]))
                texts.insert(1, "label", [target_label(r) for r in df.head(1000).itertuples()])
                lg.log_table("results/texts", dataframe=texts)
            if (run_dir / FRONTIER).exists():  # and each fluency weight's best text
                frontier = read_frontier(run_dir).drop(columns=["token_ids"]).head(5000)
                lg.log_table("results/frontier", dataframe=frontier)
            log_inputs_artifact(lg, run_dir)
            note = wandb_note(lg)
        lg.finalize("success")
    import wandb

    if wandb.run is not None:
        wandb.finish()
    return note


def wandb_targets_table(df: pd.DataFrame) -> pd.DataFrame:
    """The W&B `results/targets` table: each row's `label` (what names its unit: four latents of one
    SAE share their sites), its sites, word, objective and nearest words."""
    cols = ["target_id", "sites", "target_word", "objective", "most_activating_word",
            "most_activating_word_activation", "closest_words", "closest_cos"]
    table = df[cols].head(1000).copy()
    table.insert(1, "label", [target_label(r) for r in df.head(1000).itertuples()])
    table["sites"] = table["sites"].map(lambda s: " ".join(s[:5]))
    table["closest_words"] = table["closest_words"].map(lambda s: ", ".join(s[:5]))
    table["closest_cos"] = table["closest_cos"].map(lambda s: round(s[0], 4))
    return table


def log_inputs_artifact(lg: WandbLogger, run_dir: Path) -> None:
    """The optimized inputs and their table as a W&B artifact (uploaded on sync when offline)."""
    import wandb

    art = wandb.Artifact(f"textualization-{lg.experiment.id}", type="textualization",
                         metadata={"run_dir": str(run_dir)})
    for name in (TARGETS, INPUTS, CONFIG):
        art.add_file(str(run_dir / name))
    lg.experiment.log_artifact(art)


def format_table(df: pd.DataFrame, max_rows: int, summary: dict[str, float]) -> str:
    """The short results table printed at the end of a run."""
    shown = df.head(max_rows)
    width = max([28, *(len(target_label(r)) for _, r in shown.iterrows())])  # whole labels: a cut one may name two
    lines = [f"{'target':<{width}} {'act':>8} {'most activating word':>26} {'closest words (cos)'}"]
    for _, r in shown.iterrows():
        name = f"{target_label(r):<{width}}"
        maw = f"{r.most_activating_word} {r.most_activating_word_activation:.2f}"
        close = ", ".join(f"{w} ({c:.2f})" for w, c in zip(r.closest_words[:3], r.closest_cos[:3],
                                                            strict=True))
        lines.append(f"{name} {r.objective:>8.2f} {maw:>26} {close}")
    if len(df) > max_rows:
        lines.append(f"... {len(df) - max_rows} more rows in targets.parquet")
    keys = ["final/activation_mean", "final/maw_activation_mean", "final/activation_ratio",
            "final/closest_cos_mean", "final/closest_is_maw_rate", "group/target_top1_rate",
            "group/target_top20_rate"]
    lines.append("  ".join(f"{k.split('/')[1]}={summary[k]:.3f}" for k in keys if k in summary))
    lines.append(f"{int(df.converged.sum())}/{len(df)} targets converged, {int(df.diverged.sum())} diverged; "
                 f"steps: max {int(df.steps.max())}, median {int(df.steps.median())}")
    return "\n".join(lines)
