"""The Python API: `ft.textualize(...)` from a notebook, `ft.load(run_dir)` for a finished run.

Both go through what `python -m ft.train` uses: the same Hydra composition of `configs/` with the
same override strings, the same checks (`ft.cli.preflight.check_choices`, `ft.cli.schema.check_config`),
and `ft.train.run`. Only the defaults a notebook wants differ: W&B is off unless `wandb=True`,
and the run directory is a fresh temporary folder unless `run_dir` is given.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
from omegaconf import DictConfig, open_dict

from ft.cli.hydra_conf import register
from ft.core.errors import ConfigError, FtError

if TYPE_CHECKING:
    from ft.rundir.results import Runs

register()  # the resolvers the configs use


@dataclass
class Result:
    """A finished run: its tables and tensors, read from `run_dir` (`ft.rundir.results` has each reader)."""

    run_dir: Path
    targets: pd.DataFrame  # one row per target (targets.parquet)
    summary: dict[str, float]  # the run's metrics (summary.json)
    inputs: dict[str, torch.Tensor]  # optimized inputs and analysis vectors (inputs.safetensors)
    curves: pd.DataFrame | None  # (step, target_id, objective), the activation curves
    config: DictConfig  # the composed config the run used

    def __repr__(self) -> str:
        return f"Result({str(self.run_dir)!r}, {len(self.targets)} targets)"


def load(run_dir: str | Path) -> Result:
    """The `Result` of a finished run directory (RunFileError naming a missing or damaged file)."""
    from ft.rundir.results import read_config, read_curves, read_inputs, read_summary, read_targets

    run_dir = Path(run_dir)
    return Result(run_dir, read_targets(run_dir), read_summary(run_dir), read_inputs(run_dir),
                  read_curves(run_dir), read_config(run_dir))


def load_runs(paths: str | Path | Iterable[str | Path]) -> Runs:
    """All targets of all runs under `paths` (a run directory, a glob, or a list of them) as
    `(targets, runs)` tables (`ft.rundir.results.load_runs`)."""
    from ft.rundir.results import load_runs as read_runs
    from ft.rundir.results import run_paths

    return read_runs(run_paths(paths))


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config `python -m ft.train OVERRIDES...` composes, checked the same way."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ft.cli.preflight import check_choices, config_dir, one_line
    from ft.cli.schema import check_config

    overrides = [str(o) for o in overrides]
    hydra_keys = [o for o in overrides if o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    if hydra_keys:
        raise ConfigError(f"{hydra_keys[0]!r}: Hydra's own settings are for the command line; valid here: "
                          "config overrides, and run_dir= for the run directory")
    check_choices(overrides)
    gh = GlobalHydra.instance()
    saved = gh.hydra if gh.is_initialized() else None
    if saved is not None:  # a notebook that already uses Hydra: compose in our own context, then restore its own
        gh.clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(one_line(e)) from None
    finally:
        if saved is not None:
            GlobalHydra.instance().initialize(saved)
    check_config(cfg)
    return cfg


def recorded_name(encoder: object, name: str) -> str:
    """What a run of an in-memory model records as its `model.name_or_path`: the folder it names
    when that folder holds the same model (weights, config, vocabulary: `ft.model.vocab.model_key`);
    else `in-memory:NAME`, which no later reader (resume, ft.examples, exports) can take for a
    folder of other weights."""
    import re

    from ft.model.encoder import load_encoder, local_folder
    from ft.model.vocab import model_key

    path = local_folder(name)  # a folder, or a hub name's cached snapshot (what later readers would load)
    if path is None:
        return name
    try:
        same = model_key(load_encoder(str(path))) == model_key(encoder)
    except FtError:
        same = False
    if same:
        return name
    import logging

    short = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name) or "model"
    logging.getLogger("ft").warning("the model passed differs from %s (changed after loading): recorded as "
                                    "in-memory:%s; save it (save_pretrained) and pass its folder to let later "
                                    "readers load it", path, short)
    return f"in-memory:{short}"


def textualize(sites: Sequence[str] | None = None, model: str | object = "packaged:minilm_l6",
               tokenizer: object | None = None, steps: int | None = None, overrides: Sequence[str] = (),
               run_dir: str | Path | None = None, wandb: bool = False) -> Result:
    """Textualize `sites` (neurons `layer.L.point.unit` or heads `layer.L.head.H`), or whatever
    target `overrides` chooses (e.g. `["target=directions", "target.file=d.safetensors", ...]`).

    model: a `model.name_or_path` value, or a loaded Hugging Face encoder (then `tokenizer=` too).
    steps: `trainer.max_steps`. overrides: Hydra override strings, exactly as on the command line.
    run_dir: where the run directory goes (a temporary folder when None). wandb: log to W&B
    (offline unless logged in), as the command line does; off by default.
    """
    from ft.cli.run import run, run_name_from_overrides
    from ft.model.encoder import from_model

    given = [str(o) for o in overrides]
    extra: list[str] = []
    encoder = None
    if isinstance(model, str):
        extra.append(f"model.name_or_path={model}")
    else:
        if tokenizer is None:
            raise ConfigError(f"model={type(model).__name__} is a loaded model; valid: pass its tokenizer= too")
        name = getattr(model, "name_or_path", "") or type(model).__name__
        encoder = from_model(model, tokenizer, name)
        name = recorded_name(encoder, name)
        extra.append(f"model.name_or_path={name}")
    if sites is not None:
        if isinstance(sites, str):
            sites = [sites]
        chosen = [o for o in given if o.startswith("target=")]
        if chosen and chosen[-1] != "target=neurons":
            raise ConfigError(f"sites={list(sites)} with {chosen[-1]!r}; valid: sites for neurons and heads, or "
                              "a target= override without sites")
        extra += ["target=neurons", "target.sites=[" + ",".join(str(s).strip() for s in sites) + "]"]
    if steps is not None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ConfigError(f"steps={steps!r}; valid: an integer >= 1")
        extra.append(f"trainer.max_steps={steps}")
    if not wandb:
        extra.append("logger.wandb.mode=disabled")
    cfg = compose_config([*extra, *given])  # the caller's overrides win, as the later ones on a command line
    if cfg.run_name is None:
        with open_dict(cfg):
            cfg.run_name = run_name_from_overrides(cfg.experiment_name, given)
    if encoder is None:
        from ft.model.encoder import load_encoder

        encoder = load_encoder(cfg.model.name_or_path, cfg.model.trust_remote_code)
    made = run_dir is None
    run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="ft-run-"))
    try:
        run(cfg, run_dir, encoder)
    except FtError:
        if made:  # refused: the temporary folder made for it goes too
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return load(run_dir)


def __getattr__(name: str) -> object:  # a name that moved to another module still imports (ft.core.moved)
    from ft.core.moved import moved_attribute

    return moved_attribute(__name__, name)
