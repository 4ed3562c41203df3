"""A run directory written by the code before the restructure into subpackages (tests/fixtures/
premove_run: input=tokens on the packaged MiniLM, 2 neurons, 4 steps, with its checkpoint; its
config.yaml and checkpoint name `ft.search.build_token_input`, a module path that moved). It must
load, report, export and resume with the code of today."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

import ft

FIXTURE = Path(__file__).parent / "fixtures" / "premove_run"


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    run = tmp_path / "premove_run"
    shutil.copytree(FIXTURE, run)
    return run


def test_the_fixture_names_the_old_module_paths():
    """What makes the fixture worth keeping: it was written with the pre-move `_target_`."""
    assert OmegaConf.load(FIXTURE / "config.yaml").input._target_ == "ft.search.build_token_input"


def test_an_old_target_string_resolves_with_one_warning():
    """In a fresh process (as a resumed run starts), Hydra's resolver finds the stored
    `ft.search.build_token_input` at its new home, with one FutureWarning naming both."""
    import subprocess
    import sys

    code = ("import warnings; warnings.simplefilter('always')\n"
            "from hydra.utils import get_method\n"
            "from ft.inputs.tokens import build_token_input\n"
            "assert get_method('ft.search.build_token_input') is build_token_input\n"
            "assert get_method('ft.search.build_token_input') is build_token_input\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("FutureWarning: ft.search moved to ft.engine.search; import it from there") == 1


def test_it_loads_with_its_numbers(old_run):
    result = ft.load(old_run)
    df = result.targets
    assert list(df.label) == ["layer.1.ffn_out.3", "layer.2.ffn_out.5"]
    stored = pd.read_parquet(FIXTURE / "targets.parquet")
    assert list(df.objective) == pytest.approx(list(stored.objective))
    runs = ft.load_runs([old_run])
    assert len(runs.targets) == 2 and len(runs.runs) == 1


def test_it_reports_and_exports(old_run, tmp_path):
    from ft.cli.report import build_report
    from ft.export import main as export

    out = build_report([str(old_run)], tmp_path / "report.html")
    html = Path(out).read_text()
    assert "layer.1.ffn_out.3" in html and "layer.2.ffn_out.5" in html
    assert export([str(old_run), "--format", "hf", "-o", str(tmp_path / "hf")]) == 0
    exported = pd.read_parquet(next((tmp_path / "hf").rglob("*.parquet")))
    assert set(exported.label) == {"layer.1.ffn_out.3", "layer.2.ffn_out.5"}


def test_it_resumes_from_its_checkpoint(old_run):
    """The command that made it, with two more steps, continues the old checkpoint (whose config and
    pickled hyperparameters name `ft.search.build_token_input`, where today's config names
    `ft.engine.search.build_token_input`): the resume is logged, the curves go on from step 4,
    and the run now says 6 steps."""
    from ft.cli.run import run
    from tests.test_train import compose_cfg

    overrides = [o for o in OmegaConf.load(old_run / ".hydra" / "overrides.yaml") if "max_steps" not in o]
    cfg = compose_cfg([*overrides, "trainer.max_steps=6", "+trainer.enable_progress_bar=false",
                       "logger.wandb.mode=disabled"])
    cfg.run_name = OmegaConf.load(old_run / "config.yaml").run_name  # what `python -m ft.train` names it
    assert cfg.input._target_ == "ft.engine.search.build_token_input"
    summary = run(cfg, old_run)
    log = [json.loads(line) for line in (old_run / "resume_log.jsonl").read_text().splitlines()]
    assert log[-1]["changed"]["trainer.max_steps"] == [4, 6]
    assert json.loads((old_run / "manifest.json").read_text())["run"]["step"] == 6
    curves = pd.read_parquet(old_run / "curves.parquet")
    assert curves.step.max() > 4 and summary["final/activation_mean"] == summary["final/activation_mean"]
