"""Shards as a job array (Hydra's submitit launcher, local processes) merged by ft.merge equal the
unsharded run; a missing, unfinished or foreign shard is named."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from ft.merge import ShardError, main, merge
from ft.rundir.results import find_runs, read_config, read_curves, read_inputs, read_summary, read_targets
from tests.test_train import compose_cfg

BASE = ["trainer.max_steps=8", "logger.wandb.mode=disabled", "+trainer.enable_progress_bar=false",
        "target.per_layer=4"]  # 8 neurons over 2 layers, shards of 3, 3 and 2


@pytest.fixture(scope="module")
def shards(tiny_dir, tmp_path_factory):
    """Three shards through `hydra/launcher=local` (submitit), and the same run unsharded."""
    from ft.train import run

    root = tmp_path_factory.mktemp("shards")
    subprocess.run([sys.executable, "-m", "ft.train", "-m", "hydra/launcher=local", "target.shard=range(0,3)",
                    "target.num_shards=3", f"model.name_or_path={tiny_dir}", *BASE,
                    f"hydra.sweep.dir={root / 'array'}"],
                   check=True, cwd=root, capture_output=True, timeout=600)
    run(compose_cfg([f"model.name_or_path={tiny_dir}", *BASE]), root / "whole")
    return root


@pytest.mark.slow
def test_merged_shards_equal_the_unsharded_run(shards, tmp_path):
    dirs = find_runs([shards / "array"])
    assert len(dirs) == 3 and {int(read_config(d).target.shard) for d in dirs} == {0, 1, 2}
    assert main([str(shards / "array"), "-o", str(tmp_path / "merged")]) == 0
    got, want = read_targets(tmp_path / "merged"), read_targets(shards / "whole")
    assert list(got.target_id) == list(want.target_id) and [list(s) for s in got.sites] == [list(s) for s in want.sites]
    torch.testing.assert_close(torch.tensor(got.objective.values), torch.tensor(want.objective.values), rtol=1e-4,
                               atol=0)
    assert list(got.most_activating_word) == list(want.most_activating_word)
    a, b = read_inputs(tmp_path / "merged"), read_inputs(shards / "whole")
    assert set(a) == set(b)
    for k in b:
        rel = (a[k] - b[k]).flatten(1).norm(dim=1) / b[k].flatten(1).norm(dim=1)
        assert float(rel.max()) <= 1e-4, k
    s, w = read_summary(tmp_path / "merged"), read_summary(shards / "whole")
    for key in ("final/activation_mean", "final/closest_cos_mean", "final/num_targets", "final/steps_mean"):
        assert s[key] == pytest.approx(w[key], rel=1e-4), key
    c, cw = read_curves(tmp_path / "merged"), read_curves(shards / "whole")
    assert len(c) == len(cw) and sorted(set(c.target_id)) == sorted(set(cw.target_id))
    cfg = read_config(tmp_path / "merged")
    assert cfg.target.num_shards == 1 and len(cfg.merged_from) == 3


@pytest.mark.slow
def test_a_missing_or_unfinished_shard_is_named(shards, tmp_path, capsys):
    dirs = sorted(find_runs([shards / "array"]), key=lambda d: int(read_config(d).target.shard))
    with pytest.raises(ShardError, match=r"shard 1 of 3 is missing .* target.shard=1 target.num_shards=3"):
        merge([dirs[0], dirs[2]], tmp_path / "m1")
    broken = tmp_path / "broken"
    for d in dirs:
        shutil.copytree(d, broken / d.name)
    (broken / dirs[2].name / "targets.parquet").unlink()  # a shard that was killed before its results
    assert main([str(broken), "-o", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert "shard 2 did not finish" in err and str(broken / dirs[2].name) in err
    assert not (tmp_path / "m2").exists()
    with pytest.raises(ShardError, match="is not a shard of the same run"):
        merge([dirs[0], dirs[1], shards / "whole"], tmp_path / "m3")


def test_merged_shards_keep_their_inputs_once_and_shards_of_other_inputs_are_refused(tiny, tiny_dir, tmp_path):
    """In-process shards of an SAE run: the merged run holds the SAE the shards kept, so its
    objectives rebuild after the original changed; a shard made from another SAE is refused."""
    from ft.rundir.kept import index, kept
    from ft.train import run
    from tests.test_units import random_sae

    H = tiny.model.config.hidden_size
    src = tmp_path / "sae"
    random_sae(H, 8, seed=0).save(src)
    base = [f"model.name_or_path={tiny_dir}", "target=sae", f"target.path={src}", "target.site=layer.1.resid",
            "target.latents=[0,3,5]", "trainer.max_steps=3", "trainer.accelerator=cpu", "logger.wandb.mode=disabled",
            "+trainer.enable_progress_bar=false", "target.num_shards=2"]
    for i in range(2):
        run(compose_cfg([*base, f"target.shard={i}"]), tmp_path / f"s{i}", tiny)
    merge([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
    assert {r: e["sha256"] for r, e in index(tmp_path / "merged").items()} == \
        {r: e["sha256"] for r, e in index(tmp_path / "s0").items()}
    assert {"sae", "model"} <= set(index(tmp_path / "merged"))
    copy = kept(tmp_path / "merged", "sae")
    assert copy is not None and copy.is_relative_to(tmp_path / "merged")
    random_sae(H, 8, seed=1).save(src)  # the original changes; shard 1 made again from it
    shutil.rmtree(tmp_path / "s1")
    run(compose_cfg([*base, "target.shard=1"]), tmp_path / "s1", tiny)
    with pytest.raises(ShardError, match="read another sae"):
        merge([tmp_path / "s0", tmp_path / "s1"], tmp_path / "m2")


def test_in_process_shards_merge_into_the_unsharded_run(tiny, tiny_dir, tmp_path):
    """Two shards run in-process merge into what the unsharded run writes: the same rows, inputs
    and curves, and a config that is the unsharded run's (shard 0 of 1, plus `merged_from`)."""
    from ft.rundir.tracking import flat_config
    from ft.train import run

    base = [f"model.name_or_path={tiny_dir}", "trainer.max_steps=4", "logger.wandb.mode=disabled",
            "+trainer.enable_progress_bar=false", "target.per_layer=2"]
    run(compose_cfg(base), tmp_path / "whole", tiny)
    for i in range(2):
        run(compose_cfg([*base, "target.num_shards=2", f"target.shard={i}"]), tmp_path / f"s{i}", tiny)
    merged = merge([tmp_path / "s1", tmp_path / "s0"], tmp_path / "merged")
    a, b = read_targets(merged), read_targets(tmp_path / "whole")
    assert list(a.target_id) == list(b.target_id) == [0, 1, 2, 3]
    assert a.objective.tolist() == pytest.approx(b.objective.tolist(), rel=1e-5)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(read_inputs(merged).values(),
                                                                read_inputs(tmp_path / "whole").values(), strict=True))
    ca, cb = (read_curves(d).sort_values(["step", "target_id"]) for d in (merged, tmp_path / "whole"))
    assert ca[["step", "target_id"]].values.tolist() == cb[["step", "target_id"]].values.tolist()
    assert ca.objective.tolist() == pytest.approx(cb.objective.tolist(), rel=1e-5)
    cfg, whole = flat_config(read_config(merged)), flat_config(read_config(tmp_path / "whole"))
    assert (cfg["target.shard"], cfg["target.num_shards"]) == (0, 1)
    assert sorted(map(str, read_config(merged).merged_from)) == sorted(str(tmp_path / f"s{i}") for i in range(2))
    ignore = {"merged_from", "run_name"}
    assert {k: v for k, v in cfg.items() if k.split(".")[0] not in ignore} == \
        {k: v for k, v in whole.items() if k.split(".")[0] not in ignore}
