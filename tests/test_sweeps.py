"""Sweep files: valid for W&B's engine, expanded like `wandb agent`, runnable offline."""

import subprocess
import sys
from pathlib import Path

import pytest

from ft.rundir.results import find_runs, read_config, read_targets
from ft.sweep import SweepError, agent_command, load_sweep, run_sweep, validate

SWEEPS = sorted((Path(__file__).parents[1] / "sweeps").glob("*.yaml"))


def tiny_extra(tiny_dir, params):
    extra = [f"model.name_or_path={tiny_dir}", "trainer.max_steps=3", "trainer.accelerator=cpu",
             "+trainer.enable_progress_bar=false"]
    if params.get("experiment", "").startswith("group"):
        extra += ["target.num_random=3", "target.num_frequent=1"]
        if "target.k" not in params:
            extra.append("target.k=8")
    if params.get("experiment") == "default":
        extra.append("target.per_layer=2")
    return extra


def test_there_are_sweeps():
    names = {p.stem for p in SWEEPS}
    assert {"group_k_selection", "lr", "parameterization", "bayes_lr_param_reg"} <= names


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_is_valid_for_wandb_engine(path):
    import sweeps  # W&B's engine must be installed (README test command); never skipped

    cfg = load_sweep(path)
    assert sweeps.schema_violations_from_proposed_config(cfg) == []
    assert cfg["command"] == ["${env}", "${interpreter}", "-m", "${program}", "${args_no_hyphens}"]
    assert sweeps.next_run(cfg, []) is not None


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_agent_command_runs(path, tiny_dir, tmp_path):
    import sweeps

    cfg = load_sweep(path)
    params = {k: v["value"] for k, v in sweeps.next_run(cfg, []).config.items()}
    params = {k: v.item() if hasattr(v, "item") else v for k, v in params.items()}
    cmd = agent_command(cfg, params)
    assert cmd[:4] == ["/usr/bin/env", "python", "-m", "ft.train"]
    assert sorted(cmd[4:]) == sorted(f"{k}={v}" for k, v in params.items())
    run_dir = tmp_path / "run"
    env_path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    # as `wandb agent` starts a run: the proposed parameters in a file that wandb.init locks
    from wandb.sdk.lib import config_util

    param_file = tmp_path / "config-abc123.yaml"
    config_util.save_config_file_from_dict(str(param_file), {k: {"value": v} for k, v in params.items()})
    proc = subprocess.run(cmd + [f"hydra.run.dir={run_dir}", *tiny_extra(tiny_dir, params)],
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": env_path, "WANDB_MODE": "offline", "HOME": str(tmp_path),
                               "FT_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
                               "WANDB_SWEEP_PARAM_PATH": str(param_file), "WANDB_SWEEP_ID": "sweep1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the keys the dashboards and the report read arrive in W&B, the agent's locked ones too
    import json

    from ft.dashboard import SWEEP
    from ft.rundir.tracking import flat_config

    [wandb_file] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    info = json.loads(subprocess.run([str(Path(sys.executable).with_name("wandb")), "leet", "inspect", "--summary",
                                      "--json", str(wandb_file)], capture_output=True, text=True, timeout=120,
                                     check=True).stdout)
    config, ran = info["config"], read_config(run_dir)
    for k, v in params.items():  # locked by the sweep: the agent's values
        assert config[k] == (pytest.approx(v) if isinstance(v, float) else v), k
    flat = flat_config(ran)
    assert set(SWEEP) & set(flat) >= {"input.kind", "optim.lr", "reg.word"}  # what the dashboards plot
    for key, value in flat.items():  # every key of the run's config, with its value
        if key not in params:
            assert config[key] == value, key
    cfg_run = read_config(run_dir)
    for k, v in params.items():
        if k in ("input", "optim", "experiment"):
            continue
        node = cfg_run
        for part in k.split("."):
            node = node[part]
        assert node == pytest.approx(v) if isinstance(v, float) else node == v


@pytest.mark.parametrize("cfg,match", [
    ({"method": "grdi", "program": "ft.train", "parameters": {"optim.lr": {"values": [1]}}}, "grdi"),
    ({"method": "grid", "program": "train.py", "parameters": {"optim.lr": {"values": [1]}}}, "program"),
    ({"method": "grid", "program": "ft.train"}, "parameters"),
])
def test_bad_sweep_is_rejected(cfg, match):
    with pytest.raises(SweepError, match=match):
        validate(cfg)


def test_offline_grid_sweep_leaves_one_run_per_point(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    sweep = tmp_path / "mini.yaml"
    sweep.write_text((Path(__file__).parents[1] / "sweeps" / "lr.yaml").read_text()
                     .replace("[0.01, 0.03, 0.1, 0.3, 1.0]", "[0.05, 0.2, 0.5]"))
    dirs = run_sweep(sweep, tmp_path / "out", extra=tiny_extra(tiny_dir, {"experiment": "default"}))
    assert find_runs([tmp_path / "out"]) == dirs and len(dirs) == 3
    assert sorted(read_config(d).optim.lr for d in dirs) == [0.05, 0.2, 0.5]
    for d in dirs:
        assert len(read_targets(d)) == 4
        assert len(list(d.glob("wandb/offline-run-*/run-*.wandb"))) == 1
        assert read_config(d).logger.wandb.group == "sweep-lr"


@pytest.mark.slow
def test_cli_rejects_bad_sweep_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: grdi\nprogram: ft.train\nparameters: {optim.lr: {values: [1]}}\n")
    proc = subprocess.run([sys.executable, "-m", "ft.sweep", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "grdi" in proc.stderr.strip().splitlines()[-1]
