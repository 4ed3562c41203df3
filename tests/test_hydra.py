"""Hydra as its users know it: a --help that lists what the configs offer, one output tree named
by run_name, `main` returning `optimized_metric` for optimizing sweepers, a console script."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

from ft.cli.hydra_conf import CONFIG_DIR, describe, dirname, help_text
from ft.cli.run import optimized_value
from ft.core.errors import ConfigError
from tests.test_train import compose_cfg


def test_help_lists_every_experiment_and_option_with_its_description():
    text = help_text().replace("$$", "$")
    sections: dict[str, list[str]] = {}
    group = "experiment"
    for line in text.split("== Config groups (group=option) ==")[1].splitlines():
        if line.endswith(":") and not line.startswith(" "):
            group = line[:-1]
        elif line.startswith("  "):
            sections.setdefault(group, []).append(line.strip())
    sections["experiment"] = [x.strip() for x in text.split("== Config groups")[0].splitlines()]
    folders = [d for d in CONFIG_DIR.iterdir() if d.is_dir() and not d.name.startswith("__") and d.name != "hydra"]
    for folder in [*folders, CONFIG_DIR / "hydra" / "launcher"]:
        name = "hydra/launcher" if folder.parent.name == "hydra" else folder.name
        for p in folder.glob("*.yaml"):
            assert describe(p), p
            assert f"{p.stem:<18} {describe(p)}".strip() in sections[name], p
    assert describe(CONFIG_DIR / "input" / "gumbel.yaml").startswith("e = gumbel(x)·W_word over the vocabulary")
    assert describe(CONFIG_DIR / "target" / "clusters.yaml").startswith("Correlation clusters (Poerner et al. 2018)")


def test_help_is_what_the_command_prints(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ft.train", "--help"], capture_output=True, text=True, cwd=tmp_path,
                         check=True).stdout
    assert "== Experiments (experiment=NAME) ==" in out and "group_k250 " in out and "--hydra-help" in out
    assert describe(CONFIG_DIR / "experiment" / "single_neurons.yaml") in out
    assert not any(tmp_path.iterdir())  # help writes nothing
    from ft.inputs import input_kind, input_kinds
    from ft.targets import unit_kind, unit_kinds

    units = out.split("== Unit kinds")[1].split("== Input kinds")[0]
    for name in unit_kinds():  # every registered kind, by name, option and line
        kind = unit_kind(name)
        assert f"  {name} " in units and kind.summary_line in units and (kind.option is None or
                                                                          f"target={kind.option} " in units), name
    inputs = out.split("== Input kinds")[1].split("== Config groups")[0]
    for name in input_kinds():
        assert f"  {name} " in inputs and input_kind(name).summary in inputs, name


@pytest.mark.parametrize("name, want", [(None, "group_k10"), ("lr sweep/a", "lr_sweep_a"), ("../up", "up"),
                                        ("ok-name_1.5=x", "ok-name_1.5=x"), ("///", "group_k10")])
def test_run_folders_are_named_by_a_safe_run_name(name, want):
    assert dirname(name, "group_k10") == want


def test_runs_and_multiruns_share_one_tree():
    from hydra import compose, initialize_config_dir

    from ft.cli.hydra_conf import register

    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["run_name=my run"], return_hydra_config=True)
    run_dir, sweep_dir = str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir)
    assert run_dir.startswith("logs/train/runs/my_run/") and sweep_dir.startswith("logs/train/multiruns/my_run/")
    probe = yaml.safe_load((CONFIG_DIR / "probe.yaml").read_text())["hydra"]
    assert probe["run"]["dir"].startswith("logs/probe/runs/")


def test_the_optimized_metric_is_named_or_refused():
    cfg = compose_cfg([])
    assert cfg.optimized_metric == "final/activation_mean"
    assert optimized_value(cfg, {"final/activation_mean": 0.25, "final/steps": 3}) == 0.25
    assert optimized_value(cfg, {}) is None  # a non-zero rank returns no summary
    cfg.optimized_metric = "final/nope"
    with pytest.raises(ConfigError, match=r"optimized_metric='final/nope' is not in the run's summary; valid: "
                                          r"final/activation_mean, final/steps"):
        optimized_value(cfg, {"final/activation_mean": 0.25, "final/steps": 3})


def test_ft_train_is_a_console_script():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "ft-train"]
    assert script.value == "ft.train:cli"
    # Hydra's shell completion answers through it
    import os

    exe = Path(sys.executable).with_name("ft-train")
    out = subprocess.run([str(exe), "-sc", "query=bash"], capture_output=True, text=True, check=True,
                         env={**os.environ, "COMP_LINE": "ft-train inp"}).stdout.split()
    assert "input=" in out


@pytest.mark.slow
def test_an_optuna_sweep_maximizes_the_metric_main_returns(tiny_dir, tmp_path):
    """Three Optuna trials over optim.lr on the tiny model: the sweeper's best value is the best
    trial's final/activation_mean, and its best lr that trial's."""
    import json

    out = tmp_path / "sweep"
    subprocess.run([sys.executable, "-m", "ft.train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3",
                    "hydra.sweeper.direction=maximize", "optim.lr=interval(0.01,0.3)",
                    f"model.name_or_path={tiny_dir}", "trainer.max_steps=5", "logger.wandb.mode=disabled",
                    "+trainer.enable_progress_bar=false", f"hydra.sweep.dir={out}"],
                   check=True, cwd=tmp_path, capture_output=True)
    best = yaml.safe_load((out / "optimization_results.yaml").read_text())
    trials = {}
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        lr = yaml.safe_load((d / "config.yaml").read_text())["optim"]["lr"]
        trials[lr] = json.loads((d / "summary.json").read_text())["final/activation_mean"]
    assert len(trials) == 3
    top = max(trials, key=trials.get)
    assert best["best_value"] == pytest.approx(trials[top], rel=1e-9)
    assert best["best_params"]["optim.lr"] == pytest.approx(top, rel=1e-9)
