"""SIGTERM and SIGINT reach a real `ft.train` (and `ft.sweep`) process: a checkpoint, one line
saying how to resume, a non-zero exit; the resumed run equals an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ft.rundir.results import read_targets
from ft.sweep import SweepError, run_sweep
from tests.test_robust import cli
from tests.test_sweeps import tiny_extra


def job_env() -> dict[str, str]:
    # a fresh job: not attached to the W&B service that earlier in-process tests started
    return {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {"WANDB_MODE": "offline"}


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert path.exists(), "the run never wrote its first checkpoint"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_says_how_to_resume_and_resumes_to_the_same_result(signum, tiny_dir, tmp_path):
    run_dir = tmp_path / "stopped"
    proc = subprocess.Popen(cli(tiny_dir, run_dir), env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
    time.sleep(0.3)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted: {signal.Signals(signum).name} at step ")
    assert f"checkpoint saved to {run_dir / 'checkpoints' / 'last.ckpt'}" in last
    assert "resume with: python -m ft.train " in last and f"hydra.run.dir={run_dir}" in last
    assert not (run_dir / "targets.parquet").exists() and not list(run_dir.rglob("*.tmp"))
    step = int(last.split(" at step ")[1].split(":")[0])
    assert 0 < step < 400
    again = last.split("resume with: ")[1].split()
    done = subprocess.run([sys.executable, *again[1:]], env=job_env(), capture_output=True, text=True,
                          timeout=600)  # the printed command, as printed
    assert done.returncode == 0, done.stderr[-2000:]
    straight = tmp_path / "straight"
    ref = subprocess.run(cli(tiny_dir, straight), env=job_env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    a, b = read_targets(run_dir), read_targets(straight)
    assert (a.steps == 400).all() and (b.steps == 400).all()
    assert ((a.objective - b.objective).abs() / b.objective.abs().clip(lower=1e-6)).max() <= 1e-4


def sweep_file(tmp_path: Path, values: str = "[0.05, 0.2, 0.5]", metric: str = "final/activation_mean",
               param: str = "optim.lr") -> Path:
    path = tmp_path / "mini.yaml"
    path.write_text(f"name: mini\nprogram: ft.train\nmethod: grid\nmetric: {{name: {metric}, goal: maximize}}\n"
                    f"parameters:\n  experiment: {{value: default}}\n  {param}: {{values: {values}}}\n"
                    'command: ["${env}", "${interpreter}", "-m", "${program}", "${args_no_hyphens}"]\n')
    return path


def alive_children(marker: str) -> list[str]:
    found = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout.splitlines()
    return [line for line in found if "ft.train" in line]


@pytest.mark.slow
def test_sweep_on_sigterm_stops_its_child_and_exits_non_zero(tiny_dir, tmp_path):
    out = tmp_path / "out"
    extra = [*tiny_extra(tiny_dir, {"experiment": "default"}), "trainer.max_steps=5000",
             "engine.stop_when_converged=false", "engine.checkpoint_every_n_steps=25"]
    proc = subprocess.Popen([sys.executable, "-m", "ft.sweep", str(sweep_file(tmp_path)), "--out", str(out), "--",
                             *extra], env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / "000" / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "[ft.sweep] interrupted: SIGTERM during run 0" in err.strip().splitlines()[-1]
    assert "interrupted: SIGTERM at step" in err  # the child checkpointed and said so
    time.sleep(0.5)
    assert alive_children(str(out)) == [], "an ft.train child outlived the sweep"
    assert not (out / "001").exists()


@pytest.mark.slow
def test_sweep_with_a_metric_no_run_reports_stops_after_the_first_run(tiny_dir, tmp_path):
    with pytest.raises(SweepError, match="metric 'final/activation_maen' is not among the summary keys of .*000; "
                                         "valid: .*final/activation_mean"):
        run_sweep(sweep_file(tmp_path, metric="final/activation_maen"), tmp_path / "out",
                  extra=tiny_extra(tiny_dir, {"experiment": "default"}))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000"]


@pytest.mark.parametrize("param,values,message", [
    ("optim.lrr", "[0.1]", "Could not override 'optim.lrr'"),
    ("engine.converge_window", "[0, 10]", "engine.converge_window=0; valid: an integer >= 1"),
    ("inputt", "[onehot]", "Could not override 'inputt'"),
])
def test_sweep_parameters_are_checked_before_the_first_run(param, values, message, tiny_dir, tmp_path):
    with pytest.raises(SweepError, match=f"the first proposed run would fail: .*{message}"):
        run_sweep(sweep_file(tmp_path, values=values, param=param), tmp_path / "out",
                  extra=tiny_extra(tiny_dir, {"experiment": "default"}))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_between_steps_stops_after_the_next_step_with_a_checkpoint(signum, tiny_dir, tmp_path):
    """In-process and exact: the signal lands as step 7 starts (Lightning's own SIGTERM handler
    would let the run go on to its end and exit 0); the run stops after that step, checkpointed."""
    import torch

    from ft.core.signals import Interrupted
    from ft.train import run
    from tests.test_train import compose_cfg, tiny_overrides

    before = signal.getsignal(signum)
    cfg = compose_cfg(tiny_overrides(tiny_dir, "default", 50) + [
        "logger.wandb.mode=disabled", "engine.stop_when_converged=false",
        "+callbacks.sig._target_=tests.faults.SignalSelf", "+callbacks.sig.at=7",
        f"+callbacks.sig.signum={int(signum)}"])
    with pytest.raises(Interrupted) as e:
        run(cfg, tmp_path / "run")
    assert e.value.signum == signum and e.value.step == 8 and e.value.exit_code == 128 + signum
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(ckpt["ft_state"]["step"]) == 8
    assert not (tmp_path / "run" / "targets.parquet").exists()
    assert signal.getsignal(signum) == before  # the handlers are put back
