"""The run directory's files arrive whole: written under a temporary name, then renamed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from ft.rundir import results
from ft.rundir.results import atomic_write, read_inputs, read_summary, read_targets, write_run


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def half_then_crash(tmp: Path) -> None:
        assert tmp.parent == path.parent and tmp != path  # same folder: the rename is atomic
        tmp.write_text("half")
        assert path.read_text() == "old"  # the final name is untouched while writing
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_then_crash)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    atomic_write(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_every_run_file_arrives_by_rename(tmp_path, monkeypatch):
    """write_run renames each file into place from a temporary in the run directory; nothing
    is ever opened under its final name."""
    from omegaconf import OmegaConf

    renames: list[tuple[Path, Path]] = []
    real = os.replace

    def spy(src, dst):
        src, dst = Path(src), Path(dst)
        assert src.exists() and not dst.exists() and src.parent == dst.parent
        renames.append((src, dst))
        real(src, dst)

    monkeypatch.setattr(results.os, "replace", spy)
    df = pd.DataFrame({"target_id": [0, 1], "objective": [1.5, 2.5]})
    tensors = {"embeds": torch.arange(6.0).view(2, 1, 3), "analysis": torch.ones(2, 1, 3)}
    curves = pd.DataFrame({"step": [0, 0], "target_id": [0, 1], "objective": [0.1, 0.2]})
    run_dir = write_run(tmp_path / "run", OmegaConf.create({"seed": 3}), df, tensors, {"final/x": 1.0}, curves)
    written = {p.name for p in run_dir.iterdir()}
    assert written == {"config.yaml", "curves.parquet", "inputs.safetensors", "targets.parquet", "summary.json",
                       "manifest.json"}  # the manifest last: the run's commit record
    # the journal first (the commit point, removed once done), then the files, the manifest last
    assert [dst.name for _, dst in renames][0] == "commit.json" and len(renames) == len(written) + 1
    assert {dst.name for _, dst in renames[1:]} == written
    assert all(src.name.endswith(".tmp") for src, _ in renames) and renames[-1][1].name == "manifest.json"
    pd.testing.assert_frame_equal(read_targets(run_dir), df)
    assert torch.equal(read_inputs(run_dir)["embeds"], tensors["embeds"])
    assert read_summary(run_dir) == {"final/x": 1.0}
    assert json.loads((run_dir / "summary.json").read_text()) == {"final/x": 1.0}


def test_runs_table_holds_each_config_value(tmp_path):
    """load_runs: one row per run with the config columns people compare (values planted in the
    config), the summary beside them, and every target once with a fresh index."""
    from omegaconf import OmegaConf

    from ft.rundir.results import load_runs

    cfg = OmegaConf.create({
        "experiment_name": "exp", "model": {"name_or_path": "/m"}, "seed": 5, "steps": 9,
        "target": {"kind": "group", "k": 7, "selection": "absolute", "shard": 1},
        "input": {"kind": "softmax"}, "optim": {"_target_": "torch.optim.Adam", "lr": 0.3},
        "scheduler": {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR"},
        "reg": {"norm": 0.1, "word": 0.2}, "trainer": {"max_steps": "${steps}", "precision": "bf16-mixed"}})
    df = pd.DataFrame({"target_id": [0, 1], "objective": [1.0, 2.0]})
    tensors = {"embeds": torch.zeros(2, 1, 3)}
    write_run(tmp_path / "a", cfg, df, tensors, {"final/activation_mean": 1.5})
    neurons = OmegaConf.merge(cfg, {"target": {"kind": "neuron"}, "scheduler": None})
    write_run(tmp_path / "b", neurons, df, tensors, {"final/activation_mean": 2.5})
    write_run(tmp_path / "c", OmegaConf.create({"experiment_name": "old"}), df, tensors, {})  # a bare config
    targets, runs = load_runs([tmp_path])
    a = runs.set_index("path").loc[str(tmp_path / "a")]
    expect = {"experiment": "exp", "model": "/m", "target_kind": "group", "k": 7, "selection": "absolute",
              "input": "softmax", "optimizer": "Adam", "lr": 0.3, "scheduler": "CosineAnnealingLR",
              "reg_norm": 0.1, "reg_word": 0.2, "max_steps": 9, "precision": "bf16-mixed", "seed": 5, "shard": 1,
              "final/activation_mean": 1.5, "run": str(tmp_path / "a")}
    assert {k: a[k] for k in expect} == expect
    columns = ["run", "experiment", "model", "target_kind", "k", "selection", "input", "optimizer", "lr",
               "scheduler", "reg_norm", "reg_word", "max_steps", "precision", "seed", "shard",
               "final/activation_mean", "path"]
    assert list(runs.columns) == columns
    b = runs.set_index("path").loc[str(tmp_path / "b")]
    assert pd.isna(b.k) and pd.isna(b.selection) and pd.isna(b.scheduler) and b["final/activation_mean"] == 2.5
    c = runs.set_index("path").loc[str(tmp_path / "c")]
    assert c.experiment == "old" and c[columns[2:16]].isna().all()  # missing sections read as empty
    assert len(targets) == 6 and list(targets.index) == list(range(6))
    assert sorted(set(targets.run)) == [str(tmp_path / n) for n in "abc"]


def test_a_curves_file_the_manifest_lists_but_the_disk_lost_is_refused(tmp_path):
    """Curves are optional (runs written without them read as None), but a run whose manifest
    lists curves.parquet and whose disk lost it is damaged, not curve-less."""
    from omegaconf import OmegaConf

    from ft.core.integrity import RunFileError
    from ft.rundir.results import read_curves

    df = pd.DataFrame({"target_id": [0], "objective": [1.5]})
    curves = pd.DataFrame({"step": [0], "target_id": [0], "objective": [0.1]})
    run_dir = write_run(tmp_path / "run", OmegaConf.create({"seed": 3}), df, {"embeds": torch.ones(1, 1, 3)},
                        {"final/x": 1.0}, curves)
    assert read_curves(run_dir).objective.tolist() == [0.1]
    (run_dir / "curves.parquet").unlink()
    with pytest.raises(RunFileError):
        read_curves(run_dir)
    bare = write_run(tmp_path / "bare", OmegaConf.create({"seed": 3}), df, {"embeds": torch.ones(1, 1, 3)}, {})
    assert read_curves(bare) is None
