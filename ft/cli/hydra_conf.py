"""What ft adds to Hydra: the `--help` text built from the configs themselves, and a run folder
named by `run_name` (made safe for a path).

Registered as OmegaConf resolvers by `register()` (ft.train and ft.api call it on import):
- `${ft_help:}`: the experiments and config groups, one line each, from the first comment of
  each yaml file (so the help never drifts from the configs);
- `${ft_dirname:${run_name},${experiment_name}}`: `run_name` with anything but letters, digits
  and `._=+-` replaced by `_`, or the experiment's name when `run_name` is unset.
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(str(files("ft.configs")))  # configs/ ships as ft.configs
UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")
# a sentence ends at a period and a space, except after "al." or "e.g." (citations, examples)
SENTENCE = re.compile(r"(.+?(?<!\bal)(?<!e\.g)\.)(\s|$)")


def dirname(run_name: object, experiment: object) -> str:
    """A folder name for a run: its `run_name` made safe (no separators, no leading dot), else the
    experiment's name."""
    name = "" if run_name is None else UNSAFE.sub("_", str(run_name)).strip("._")[:100]
    return name or UNSAFE.sub("_", str(experiment)) or "run"


def describe(path: Path) -> str:
    """The first sentence of a config file's leading comment ('' when it has none)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text and not text.startswith("@package"):
            lines.append(text)
    text = " ".join(lines)
    m = SENTENCE.match(text)
    first = m.group(1) if m else text
    return first if len(first) <= 110 else first[:107].rstrip() + "..."


def kinds_text() -> list[str]:
    """Every registered unit kind and input kind, one line each (ft.targets.registry, ft.inputs)."""
    from ft.inputs.registry import input_kind, input_kinds
    from ft.targets.registry import unit_kind, unit_kinds

    out = ["== Unit kinds (target=OPTION; its target.kind) =="]
    for name in unit_kinds():
        kind = unit_kind(name)
        option = f"target={kind.option}" if kind.option else "(in target.sites)"
        out.append(f"  {name:<10} {option:<18} {kind.summary_line}")
    out += ["", "== Input kinds (input=KIND) =="]
    out += [f"  {name:<10} {input_kind(name).summary}" for name in input_kinds()]
    return out


def help_text(config_dir: Path = CONFIG_DIR) -> str:
    """The experiments, then every config group's options, each with its description."""
    out = ["== Experiments (experiment=NAME) ==", "python -m ft.train experiment=NAME [key=value ...]", ""]
    for p in sorted((config_dir / "experiment").glob("*.yaml")):
        out.append(f"  {p.stem:<18} {describe(p)}")
    out += ["", *kinds_text(), "", "== Config groups (group=option) =="]
    groups = sorted(d.name for d in config_dir.iterdir() if d.is_dir() and d.name not in ("experiment", "hydra")
                    and not d.name.startswith("__") and any(d.glob("*.yaml")))  # plan/ holds model shapes
    for group in [*groups, "hydra/launcher"]:  # ft's launchers: Slurm job arrays, local processes
        out.append(f"{group}:")
        for p in sorted((config_dir / group).glob("*.yaml")):
            out.append(f"  {p.stem:<18} {describe(p)}".rstrip())
    out += ["", "Any key can be set (key=value); `--cfg job` prints the composed config."]
    return "\n".join(out).replace("$", "$$")  # Hydra's template substitutes $NAMES


def register() -> None:
    if not OmegaConf.has_resolver("ft_help"):
        OmegaConf.register_new_resolver("ft_help", lambda: help_text())
    if not OmegaConf.has_resolver("ft_dirname"):
        OmegaConf.register_new_resolver("ft_dirname", dirname)
