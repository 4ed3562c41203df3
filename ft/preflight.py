"""Checks on the command line of `python -m ft.train`, before Hydra creates a run directory.

Hydra writes `.hydra/` before the job starts and exits 1 with a multi-line message on its own
composition errors. `preflight(argv)` composes the same config with Hydra's compose API, runs
`ft.schema`'s checks on it (and those needing the model's config, read without its weights), and
turns any problem into one line on stderr and exit code 2, with nothing written. Under
`--multirun` every value of a swept key is checked (each with the other keys' first values).
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from ft.encoder import load_model_config
from ft.errors import FtError
from ft.schema import check_config, check_model

MULTIRUN_FLAGS = ("-m", "--multirun")
MAX_VARIANTS = 256


class PreflightError(FtError):
    """The command line cannot run; the message is the one line printed."""


def config_dir() -> str:
    from importlib.resources import files

    return str(files("ft.configs"))


def check_choices(overrides: list[str]) -> None:
    """An unknown config-group option (experiment=nope, input=logits) names the valid ones."""
    root = Path(config_dir())
    for arg in overrides:
        key, eq, value = arg.lstrip("+~").partition("=")
        if not eq or "." in key or "/" in key or not (root / key).is_dir():
            continue
        options = sorted(p.stem for p in (root / key).glob("*.yaml"))
        if value not in options and value != "null":
            raise PreflightError(f"{key}={value!r} is not an option; valid: {', '.join(options)}")


def one_line(e: Exception) -> str:
    """Hydra/OmegaConf messages span lines (the key, a hint, the object type): keep the first two."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("object_type")]
    return " ".join(lines[:3]) or type(e).__name__


def parse(overrides: list[str]) -> list:
    """Hydra's parse of each override; one that does not parse is named."""
    parser, parsed = OverridesParser.create(), []
    for arg in overrides:
        try:
            parsed += parser.parse_overrides([arg])
        except HydraException as e:
            raise PreflightError(f"{arg!r} does not parse: {one_line(e)}") from None
    return parsed


def sweep_values(o: object) -> list[str]:
    """The values of a swept override to check: each choice or range value; an interval's two ends
    (an optimizing sweeper such as Optuna draws inside it)."""
    from hydra.core.override_parser.types import IntervalSweep

    value = o.value()
    if isinstance(value, IntervalSweep):
        return [str(value.start), str(value.end)]
    return list(o.sweep_string_iterator())


def variants(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The command lines to check: as given, or under --multirun one per value of each swept key."""
    parsed = parse(overrides)
    if not multirun:
        return [overrides]
    choices: list[list[str]] = []
    for o in parsed:
        if o.is_sweep_override():
            prefix = {"ADD": "+", "DELETE": "~", "FORCE_ADD": "++"}.get(o.type.name, "")
            choices.append([f"{prefix}{o.get_key_element()}={v}" for v in sweep_values(o)])
        else:
            choices.append([o.input_line])
    first = [c[0] for c in choices]
    out = [first]
    for i, c in enumerate(choices):
        out += [first[:i] + [v] + first[i + 1:] for v in c[1:]]
    return out[:MAX_VARIANTS]


def check_command_line(overrides: list[str]) -> None:
    """Compose `overrides` as `python -m ft.train` would and check every value."""
    job = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    check_choices(job)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("train", overrides=job)
        check_config(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise PreflightError(one_line(e)) from None
    finally:
        GlobalHydra.instance().clear()
    check_model(cfg, load_model_config(cfg.model.name_or_path, cfg.model.trust_remote_code))


def check_writable(overrides: list[str], multirun: bool) -> None:
    """The folder the run directory goes in can be written (Hydra writes `.hydra/` there first)."""
    import os

    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    given = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith(key)]
    target = Path(given[-1]) if given else Path.cwd() / "logs"
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if os.access(existing, os.W_OK):
        return
    ro = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    raise PreflightError(f"cannot write the run directory {target}: {existing} is "
                         f"{'on a read-only file system' if ro else 'not writable (permission denied)'}; "
                         "valid: a writable hydra.run.dir=...")


def preflight(argv: list[str]) -> None:
    """Exit 2 with one line on stderr if `argv` cannot run; return if it can. Hydra's own flags
    (--help, --cfg, --config-dir, ...) are left to Hydra, and the job checks its config again."""
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in MULTIRUN_FLAGS for f in flags):
        return
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        for line in variants(overrides, multirun=bool(flags)):
            check_command_line(line)
        check_writable(overrides, multirun=bool(flags))
    except FtError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
