"""`python -m ft.train [experiment=NAME] [key=value ...]`: one textualization run.

`run(cfg, run_dir)` does the work and is what tests call; `main` is the thin Hydra entry.
"""

from __future__ import annotations

import logging
import sys
from importlib.resources import files
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

from ft.cli.hydra_conf import register as register_resolvers
from ft.cli.preflight import preflight
from ft.cli.resume import (
    finished_step,
)
from ft.cli.run import optimized_value, run, run_name_from_overrides
from ft.core.errors import FtError
from ft.core.signals import Interrupted

log = logging.getLogger("ft")
register_resolvers()  # ${ft_dirname:...} in hydra.run.dir, ${ft_help:} in --help


CONFIG_DIR = str(files("ft.configs"))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """One run; returns its `optimized_metric`, which Hydra's optimizing sweepers (Optuna) read."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    if cfg.run_name is None:
        with open_dict(cfg):
            cfg.run_name = run_name_from_overrides(cfg.experiment_name, list(hc.overrides.task))
    from hydra.types import RunMode

    from ft.cli.undo import NothingToDo

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
    from ft.cli.undo import nothing_left_if_refused
    from ft.core.signals import jobs_stop_with_launcher

    preflight(sys.argv[1:])  # one-line errors (exit 2) before Hydra writes anything
    logging.raiseExceptions = False  # a library's log file on a full disk: no "--- Logging error ---" traceback
    with nothing_left_if_refused(sys.argv[1:]), jobs_stop_with_launcher(sys.argv[1:]):  # (SIGTERM: the jobs too)
        main()


def __getattr__(name: str) -> object:  # a name that moved to another module still imports (ft.core.moved)
    from ft.core.moved import moved_attribute

    return moved_attribute(__name__, name)


if __name__ == "__main__":
    cli()
