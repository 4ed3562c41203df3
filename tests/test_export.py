"""Exports others can load: the `hf` folder through Hugging Face `datasets`, round-tripped against the
run's own files; what both formats share: run names, refusals, failed writes, repeatability. (The
`neuronpedia` layout: tests/test_neuronpedia.py.)"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch
import yaml

from ft.export import main
from ft.rundir.results import read_inputs, read_summary, read_targets
from tests.test_train import compose_cfg


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    from ft.train import run

    root = tmp_path_factory.mktemp("export_runs")
    base = [f"model.name_or_path={tiny_dir}", "trainer.max_steps=6", "logger.wandb.mode=disabled",
            "+trainer.enable_progress_bar=false"]
    run(compose_cfg([*base, "target.sites=[layer.0.ffn_out.3,layer.1.ffn_act.9,layer.1.head.0]"]), root / "neurons")
    run(compose_cfg([*base, "target=terms", "target.specs=[layer.1.ffn_out.7 - layer.0.ffn_out.2]", "input=tokens",
                     "search.patience=2"]), root / "tokens")
    return root


def test_hf_export_loads_with_datasets_and_round_trips(runs, tmp_path):
    import datasets

    out = tmp_path / "hf"
    assert main([str(runs / "neurons"), str(runs / "tokens"), "--format", "hf", "-o", str(out)]) == 0
    ds = datasets.load_dataset("parquet", data_dir=str(out / "data"))["train"]
    assert len(ds) == 4 and ds.column_names[:3] == ["run", "model", "label"]
    same = datasets.load_dataset(str(out))["train"]  # the card's configs name the data files
    assert len(same) == 4
    for name in ("neurons", "tokens"):
        t, inputs = read_targets(runs / name), read_inputs(runs / name)
        rows = [r for r in ds if r["run"].endswith(f"-{name}")]
        assert [r["objective"] for r in rows] == pytest.approx(list(t.objective))
        assert [r["sites"] for r in rows] == [list(s) for s in t.sites]
        assert [r["closest_words"] for r in rows] == [list(w) for w in t.closest_words]
        torch.testing.assert_close(torch.tensor([r["embeds"] for r in rows]), inputs["embeds"].float())
    text_rows = [r for r in ds if r["run"].endswith("-tokens")]
    assert isinstance(text_rows[0]["text"], str) and text_rows[0]["input_kind"] == "tokens"
    header = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert header["ft_version"] and header["configs"][0]["data_files"][0]["path"].startswith("data/")
    assert {r["metrics"]["final/activation_mean"] for r in header["runs"]} == {
        read_summary(runs / n)["final/activation_mean"] for n in ("neurons", "tokens")}
    assert "```yaml" in (out / "README.md").read_text()  # each run's config, as it was made


def test_exports_refuse_bad_input_and_leave_nothing(runs, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    assert main([str(runs / "neurons"), "--format", "hf", "-o", str(busy)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert main([str(tmp_path), "--format", "hf", "-o", str(tmp_path / "o")]) == 2
    assert "no run directories" in capsys.readouterr().err and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        main([str(runs / "neurons"), "--format", "csv", "-o", str(tmp_path / "o")])


@pytest.fixture(scope="module")
def sae_run(tiny_dir, tmp_path_factory):
    from ft.targets.sae_file import SAE
    from ft.train import run

    root = tmp_path_factory.mktemp("export_sae")
    g = torch.Generator().manual_seed(1)
    SAE(torch.randn(32, 8, generator=g), torch.randn(8, generator=g), torch.randn(8, 32, generator=g),
        torch.zeros(32)).save(root / "sae")
    run(compose_cfg([f"model.name_or_path={tiny_dir}", "trainer.max_steps=4", "logger.wandb.mode=disabled",
                     "+trainer.enable_progress_bar=false", "target=sae", f"target.path={root / 'sae'}",
                     "target.site=layer.1.resid", "target.latents=[2,5]"]), root / "run")
    return root / "run"


def hf(paths, out) -> int:
    return main([*map(str, paths), "--format", "hf", "-o", str(out)])


def test_hf_rows_of_sae_latents_name_their_latent_and_sae(sae_run, tmp_path):
    assert hf([sae_run], tmp_path / "hf") == 0
    df = pd.read_parquet(tmp_path / "hf" / "data" / "train-00000-of-00001.parquet")
    t = read_targets(sae_run)
    assert list(df.latent) == [2, 5] and list(df.label) == ["layer.1.resid:sae.2", "layer.1.resid:sae.5"]
    assert list(df.sae_path) == list(t.sae_path) and df.sae_post.tolist() == pytest.approx(list(t.sae_post))


def test_two_runs_with_one_name_are_both_exported(runs, tmp_path, capsys):
    for side in ("a", "b"):
        shutil.copytree(runs / "neurons", tmp_path / side / "neurons")
    (tmp_path / "link").symlink_to(tmp_path / "a" / "neurons")  # one of them again, by another path
    assert hf([tmp_path / "a", tmp_path / "b", tmp_path / "link"], tmp_path / "hf") == 0
    assert "2 runs" in capsys.readouterr().out
    df = pd.read_parquet(tmp_path / "hf" / "data" / "train-00000-of-00001.parquet")
    names = sorted(set(df.run))
    assert len(df) == 6 and len(names) == 2 and all(n.startswith("default-neurons-") for n in names)
    text = (tmp_path / "hf" / "README.md").read_text()
    header = yaml.safe_load(text.split("---\n")[1])
    assert sorted(r["name"] for r in header["runs"]) == names
    assert all(f"## {n}\n" in text for n in names)  # each run's config


def test_the_same_hf_export_twice_is_the_same_bytes(runs, tmp_path):
    for name in ("one", "two"):
        assert hf([runs / "neurons", runs / "tokens"], tmp_path / name) == 0
    for f in ("README.md", "data/train-00000-of-00001.parquet"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes()


def one_line_error(capsys, *words: str) -> None:
    """One line of error (beside progress bars), naming `words`, and no traceback."""
    text = capsys.readouterr().err
    [err] = [line for line in text.splitlines() if "error" in line.lower()]
    assert err.startswith("error: ") and "Traceback" not in text, text
    assert all(w in err for w in words), err


@pytest.mark.parametrize("fmt", ["hf", "neuronpedia"])
def test_an_unwritable_out_is_one_line_and_leaves_nothing(runs, tmp_path, capsys, fmt):
    from tests.faults import fill, tmpfs

    args = [str(runs / "neurons"), "--format", fmt, "--max-sentences", "40", "-o"]
    (tmp_path / "file").write_text("x")
    assert main([*args, str(tmp_path / "file" / "deeper" / "out")]) == 2
    one_line_error(capsys, "is a file", "valid:")
    assert (tmp_path / "file").read_text() == "x"
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        assert main([*args, str(ro / "out")]) == 2
        one_line_error(capsys, str(ro / "out"), "Read-only file system")
    with tmpfs(tmp_path / "full", size="256k") as full:
        fill(full)
        assert main([*args, str(full / "a" / "b" / "out")]) == 2
        one_line_error(capsys, "cannot write", "No space left on device")
        assert sorted(p.name for p in full.iterdir()) == ["filler.bin"]  # no temp folder, no parents made
