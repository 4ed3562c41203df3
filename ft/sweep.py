"""`python -m ft.sweep sweeps/<file>.yaml [--max-runs N] [--out DIR] [-- overrides...]`

Runs a W&B sweep YAML on this machine with no W&B server: W&B's own sweep engine (the
`sweeps` package, the one the W&B server runs) proposes each run -- grid, random or bayes,
fed back with each finished run's metric -- and every run is started with exactly the
command `wandb agent` would build from the file's `command` and its macros. Each run gets
its own run directory and W&B run (offline unless WANDB_MODE says otherwise), grouped by
the sweep's name.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ft.core.errors import FtError
from ft.rundir.results import SUMMARY


class SweepError(FtError):
    """The sweep YAML is not a valid W&B sweep."""


def load_sweep(path: str | Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        cause = " ".join(str(e).split())  # YAML's message spans lines: one line here
        raise SweepError(f"cannot read sweep file {str(path)!r}: {cause}; valid: a W&B sweep YAML in UTF-8") from None
    validate(cfg, str(path))
    return cfg


def engine() -> Any | None:
    """W&B's sweep engine, when the `sweeps` package is importable."""
    try:
        import sweeps
    except ImportError:
        return None
    return sweeps


def validate(cfg: Any, name: str = "sweep") -> None:
    """Raise SweepError unless W&B's sweep engine accepts `cfg` and proposes a first run."""
    if not isinstance(cfg, dict) or "parameters" not in cfg:
        raise SweepError(f"{name}: a sweep needs a mapping with 'parameters'")
    if cfg.get("program") != "ft.train":
        raise SweepError(f"{name}: program={cfg.get('program')!r}; valid: ft.train")
    sw = engine()
    if sw is None:
        if cfg.get("method") != "grid":
            raise SweepError(f"{name}: method={cfg.get('method')!r} needs the `sweeps` package")
        return
    problems = sw.schema_violations_from_proposed_config(cfg)
    if problems:
        raise SweepError(f"{name}: rejected by W&B's sweep engine: {'; '.join(problems)}")
    try:
        sw.next_run(cfg, [])
    except Exception as e:  # the engine's own errors carry the reason
        raise SweepError(f"{name}: W&B's sweep engine cannot propose a run: {e}") from e


def agent_command(cfg: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The command `wandb agent` runs for one proposed run (wandb/wandb_agent.py, _command_run)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    sweep_command = sweep_utils.create_sweep_command(list(cfg.get("command") or []) or None)
    sweep_vars = sweep_utils.create_sweep_command_args(
        {"args": {k: {"value": v} for k, v in params.items()}})
    sweep_vars["interpreter"] = ["python"]
    sweep_vars["program"] = [cfg["program"]]
    sweep_vars["env"] = ["/usr/bin/env"]
    out: list[str] = []
    for c in map(str, sweep_command):
        if c.startswith("${") and c.endswith("}"):
            out += sweep_vars.get(c[2:-1]) or []
        else:
            out.append(c)
    return out


def grid_points(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Fallback when the `sweeps` package is missing: the grid, as W&B enumerates it."""
    names = sorted(cfg["parameters"])
    choices = [p["values"] if "values" in p else [p["value"]] for p in map(cfg["parameters"].get, names)]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]


def plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


class SweepInterrupted(Exception):  # noqa: N818 - what happened, not an error in the input
    """SIGTERM/SIGINT reached the sweep; its running child was stopped (and checkpointed)."""

    def __init__(self, signum: int, run_dir: Path, index: int):
        self.signum, self.run_dir, self.index = signum, run_dir, index
        super().__init__(f"{signal.Signals(signum).name} during run {index} ({run_dir}); that run saved its "
                         "checkpoint and resumes when its command is run again with the same hydra.run.dir")


def check_parameters(cfg: dict[str, Any], params: dict[str, Any], extra: list[str], name: str) -> None:
    """Before the first run: every parameter is a config key (or group) and its first value is valid."""
    from ft.cli.preflight import check_command_line

    overrides = [f"{k}={v}" for k, v in params.items()] + list(extra)
    try:
        check_command_line(overrides)
    except FtError as e:
        raise SweepError(f"{name}: the first proposed run would fail: {e} (parameters: {', '.join(params)})") from None


def check_metric(metric: str, summary: dict[str, Any], run_dir: Path, name: str) -> None:
    if metric not in summary:
        keys = ", ".join(k for k in sorted(summary) if "/" in k)
        raise SweepError(f"{name}: metric {metric!r} is not among the summary keys of {run_dir}; valid: {keys}")


class ChildRunner:
    """Runs one child at a time in its own session; SIGTERM/SIGINT to the sweep go on to the
    child as SIGTERM (it checkpoints and exits), and the sweep then stops."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.signum: int | None = None

    def note(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        if self.child is not None and self.child.poll() is None:
            try:
                os.killpg(self.child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def run(self, cmd: list[str], env: dict[str, str]) -> int:
        previous = {s: signal.signal(s, self.note) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.child = subprocess.Popen(cmd, env=env, start_new_session=True)
            try:
                return self.child.wait()
            except BaseException:
                self.note(signal.SIGTERM, None)
                raise
            finally:
                if self.child.poll() is None:  # a child that ignores SIGTERM for 2 minutes is killed
                    try:
                        self.child.wait(timeout=120)
                    except subprocess.TimeoutExpired:
                        os.killpg(self.child.pid, signal.SIGKILL)
                        self.child.wait()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def run_sweep(path: str | Path, out: str | Path | None = None, max_runs: int | None = None,
              extra: list[str] | None = None) -> list[Path]:
    """Propose and run every point of the sweep; return the run directories."""
    cfg = load_sweep(path)
    name = cfg.get("name") or Path(path).stem
    out = Path(out or Path("logs") / "sweeps" / name / time.strftime("%Y-%m-%d_%H-%M-%S"))
    env = {**os.environ, "WANDB_RUN_GROUP": f"sweep-{name}"}
    env.setdefault("WANDB_MODE", "offline")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` = ours
    sw = engine()
    metric = (cfg.get("metric") or {}).get("name")
    runs: list[Any] = []
    grid = None if sw else iter(grid_points(cfg))
    dirs: list[Path] = []
    limit = max_runs if max_runs is not None else (10**6 if cfg.get("method") == "grid" else 20)
    runner = ChildRunner()
    while len(dirs) < limit:
        if sw:
            proposal = sw.next_run(cfg, runs)
            if proposal is None:
                break
            params = {k: plain(v["value"]) for k, v in proposal.config.items()}
        else:
            params = next(grid, None)
            if params is None:
                break
        if not dirs:
            check_parameters(cfg, params, extra or [], name)
        run_dir = out / f"{len(dirs):03d}"
        cmd = agent_command(cfg, params) + [f"hydra.run.dir={run_dir}", *(extra or [])]
        print(f"[ft.sweep] run {len(dirs)}: {' '.join(cmd)}", flush=True)
        code = runner.run(cmd, env)
        dirs.append(run_dir)
        if runner.signum is not None:
            raise SweepInterrupted(runner.signum, run_dir, len(dirs) - 1)
        summary_file = run_dir / SUMMARY
        summary = json.loads(summary_file.read_text()) if code == 0 and summary_file.exists() else None
        if metric and summary is not None:
            check_metric(metric, summary, run_dir, name)
        if sw:
            proposal.state = sw.RunState.finished if code == 0 else sw.RunState.failed
            if summary is not None and metric:
                proposal.summary_metrics = {metric: summary.get(metric)}
            runs.append(proposal)
        if code != 0:
            print(f"[ft.sweep] run {len(dirs) - 1} failed with exit code {code}", file=sys.stderr)
    print(f"[ft.sweep] {len(dirs)} runs under {out}")
    return dirs


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    from ft.cli.preflight import OneLineParser

    p = OneLineParser(prog="python -m ft.sweep", description="Run a W&B sweep YAML offline on this machine.")
    p.add_argument("sweep", help="a sweeps/*.yaml file")
    p.add_argument("--out", help="folder for the run directories (default logs/sweeps/<name>/<time>)")
    p.add_argument("--max-runs", type=int,
                   help="stop after this many runs (default: all grid points, 20 otherwise)")
    args = p.parse_args(argv)
    if args.max_runs is not None and args.max_runs < 1:  # 0 or less ran nothing and exited 0
        print(f"error: --max-runs {args.max_runs}; valid: an integer >= 1 (or leave it out)", file=sys.stderr)
        sys.exit(2)
    try:
        dirs = run_sweep(args.sweep, args.out, args.max_runs, extra)
    except FtError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except SweepInterrupted as e:
        print(f"[ft.sweep] interrupted: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    if not all((d / SUMMARY).exists() for d in dirs):
        sys.exit(1)


if __name__ == "__main__":
    main()
