"""The Python API: `ft.textualize` is the command line's run (same config, same numbers), `ft.load`
reads it back, and the README's snippet runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import ft
from ft.core.errors import FtError

ROOT = Path(__file__).resolve().parent.parent
SITES = ["layer.0.ffn_out.3", "layer.1.ffn_out.7", "layer.1.head.1"]


def test_import_ft_exports_the_api():
    assert set(ft.__all__) >= {"textualize", "load", "load_runs", "Result"}
    assert ft.textualize.__module__ == "ft.api" and ft.load_runs.__module__ == "ft.api"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ft.nope  # noqa: B018


def test_textualize_equals_the_command_line(tiny_dir, tmp_path):
    """The same settings through `python -m ft.train` (a subprocess, as a user runs it) and through
    `ft.textualize`: the same objectives (1e-5 relative), inputs and config."""
    cli = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "ft.train", f"model.name_or_path={tiny_dir}",
                    "target.sites=[" + ",".join(SITES) + "]", "trainer.max_steps=12", "logger.wandb.mode=disabled",
                    "optim.lr=0.05", f"hydra.run.dir={cli}"], check=True, cwd=tmp_path, capture_output=True)
    result = ft.textualize(sites=SITES, model=str(tiny_dir), steps=12, overrides=["optim.lr=0.05"],
                           run_dir=tmp_path / "api")
    want = pd.read_parquet(cli / "targets.parquet")
    assert list(result.targets.kind) == ["neuron", "neuron", "head"]
    torch.testing.assert_close(torch.tensor(result.targets.objective.values), torch.tensor(want.objective.values),
                               rtol=1e-5, atol=0)
    assert list(result.targets.most_activating_word) == list(want.most_activating_word)
    from safetensors.torch import load_file

    cli_inputs = load_file(str(cli / "inputs.safetensors"))
    assert set(result.inputs) == set(cli_inputs)
    for k in cli_inputs:
        torch.testing.assert_close(result.inputs[k], cli_inputs[k], rtol=1e-5, atol=1e-6)
    assert result.config.trainer.max_steps == 12 and result.config.optim.lr == 0.05
    assert result.config.logger.wandb.mode == "disabled" and not (tmp_path / "api" / "wandb").exists()
    assert result.curves.step.max() == 11  # steps 0..11
    again = ft.load(result.run_dir)
    pd.testing.assert_frame_equal(again.targets, result.targets)
    assert again.summary == result.summary


def test_textualize_takes_a_loaded_model_and_any_target(tiny, tmp_path):
    a = ft.textualize(sites="layer.1.ffn_out.7", model=tiny.model, tokenizer=tiny.tokenizer, steps=5)
    assert a.run_dir.name.startswith("ft-run-") and a.targets.sites[0].tolist() == ["layer.1.ffn_out.7"]
    b = ft.textualize(model=tiny.model, tokenizer=tiny.tokenizer, steps=5, run_dir=tmp_path / "terms",
                      overrides=["target=terms", "target.specs=[layer.1.ffn_out.7 - layer.0.ffn_out.2]"])
    assert list(b.targets.kind) == ["terms"] and b.targets.spec[0] == "layer.1.ffn_out.7 - layer.0.ffn_out.2"
    runs = ft.load_runs([a.run_dir, b.run_dir])
    assert len(runs.targets) == 2 and list(runs.runs.path) == [str(a.run_dir), str(b.run_dir)]
    targets, table = runs  # still unpacks as before
    assert table is runs.runs


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps=0; valid: an integer >= 1"),
    ({"overrides": ["optim=nadam"]}, "optim='nadam' is not an option; valid"),
    ({"overrides": ["optim.lr=-1"]}, "optim.lr=-1"),
    ({"overrides": ["hydra.run.dir=/x"]}, "Hydra's own settings"),
    ({"sites": ["layer.0.ffn_out.1"], "overrides": ["target=directions"]}, "with 'target=directions'"),
    ({"model": torch.nn.Linear(2, 2)}, "pass its tokenizer"),
])
def test_bad_api_calls_are_refused_in_one_line(tiny_dir, tmp_path, kwargs, message):
    kwargs = {"model": str(tiny_dir), "run_dir": tmp_path / "run", **kwargs}
    with pytest.raises(FtError, match=re.escape(message)):
        ft.textualize(**kwargs)
    assert not (tmp_path / "run").exists()


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- api-snippet -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md has no api-snippet block"
    return m.group(1)


@pytest.mark.slow
def test_the_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    """The README's notebook example on the packaged MiniLM, executed verbatim."""
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_snippet(), "README.md", "exec"), scope)
    result = scope["result"]
    assert isinstance(result, ft.Result) and len(result.targets) == 2
    assert (result.targets.objective > 0).all()


def test_a_notebooks_own_hydra_context_survives(tiny_dir):
    """Composing ft's config inside someone else's Hydra context leaves theirs in place."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ft.api import compose_config

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        theirs = GlobalHydra.instance().hydra
        cfg = compose_config([f"model.name_or_path={tiny_dir}", "optim.lr=0.2"])
        assert GlobalHydra.instance().hydra is theirs and cfg.optim.lr == 0.2
