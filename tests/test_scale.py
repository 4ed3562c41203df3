"""Scale: chunk planning, deterministic shards, several processes == one process."""

import subprocess
import sys

import pytest
import torch

from ft.engine.module import plan_chunks
from ft.engine.strategy import shard_rows
from ft.model.sites import Site
from ft.rundir.results import read_inputs, read_targets


def test_chunks_cut_at_layer_changes_and_size():
    lists = [[Site(0, "ffn_out", i)] for i in range(5)] + [[Site(1, "ffn_out", i)] for i in range(3)]
    assert plan_chunks(lists, 2) == [slice(0, 2), slice(2, 4), slice(4, 5), slice(5, 7), slice(7, 8)]
    assert plan_chunks(lists, 100) == [slice(0, 5), slice(5, 8)]


@pytest.mark.parametrize("n,k", [(10, 3), (2, 2), (7, 1), (5, 4)])
def test_shards_cover_rows_once_in_order(n, k):
    rows = [i for s in range(k) for i in range(n)[shard_rows(n, s, k)]]
    assert rows == list(range(n))
    sizes = [len(range(n)[shard_rows(n, s, k)]) for s in range(k)]
    assert max(sizes) - min(sizes) <= 1


def cli_run(tiny_dir, run_dir, *extra):
    cmd = [sys.executable, "-m", "ft.train", f"model.name_or_path={tiny_dir}", "trainer.max_steps=15",
           "trainer.accelerator=cpu", "target.per_layer=5", "logger.wandb.mode=disabled",
           f"hydra.run.dir={run_dir}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_targets(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    [],  # embedding + Adam
    # the one-hot fast path: its preconditioning hook must follow the rows each rank keeps
    ["input=onehot", "optim=sgd", "optim.lr=20", "input.save_raw=true"],
    # the token search: each row draws its candidates by its own target row, not by its rank's
    ["input=tokens", "input.length=2", "search.topk=8", "search.candidates=6"],
], ids=["embedding-adam", "onehot-fast-sgd", "tokens"])
def test_two_cpu_processes_equal_one(tiny_dir, tmp_path, extra):
    one = cli_run(tiny_dir, tmp_path / "one", *extra)
    two = cli_run(tiny_dir, tmp_path / "two", "trainer.devices=2", *extra)
    assert len(one) == len(two) == 10
    assert list(one.sites) == list(two.sites)
    rel = ((one.objective - two.objective).abs() / one.objective.abs().clip(lower=1e-6)).max()
    assert rel <= 1e-4, rel
    assert (two.steps == 15).all()
    if "input=tokens" in extra:
        assert list(one.token_ids.map(list)) == list(two.token_ids.map(list))
    a, b = read_inputs(tmp_path / "one"), read_inputs(tmp_path / "two")
    assert set(a) == set(b)
    for name in a:  # embeds, analysis and, for one-hot, the recovered input-space vectors
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


def test_memory_budget_sets_chunk_rows(tiny, tiny_dir, tmp_path):
    from ft.engine.module import rows_for_budget
    from ft.train import run
    from tests.test_train import compose_cfg, tiny_overrides

    cfg = tiny.model
    small, big = rows_for_budget(cfg, 1, 1), rows_for_budget(cfg, 1, 1024)
    assert 1 <= small < big and rows_for_budget(cfg, 1, 1024, input_row_floats=10**6) < big
    # the documented estimate, by hand: half the budget over 4 bytes x the floats a row keeps
    S, L, H, inter, heads = 3, 2, 32, 64, 2
    per_row = 4 * (S * L * (12 * H + 4 * inter + 2 * heads * S) + 2 * 100)
    assert rows_for_budget(cfg, 1, 64, input_row_floats=100) == 64 * 2**20 // 2 // per_row
    assert rows_for_budget(cfg, 1, 1e-9) == 1  # never zero rows
    base = tiny_overrides(tiny_dir, "default", 6) + ["logger.wandb.mode=disabled"]
    run(compose_cfg(base + ["engine.chunk_size=auto", "engine.memory_budget_mb=0.05"]), tmp_path / "a")
    run(compose_cfg(base + ["engine.chunk_size=256"]), tmp_path / "b")
    a, b = read_targets(tmp_path / "a"), read_targets(tmp_path / "b")
    assert ((a.objective - b.objective).abs() <= 1e-4 * b.objective.abs().clip(lower=1e-6)).all()


@pytest.mark.parametrize("n,world", [(10, 3), (2, 2), (7, 1), (5, 4), (228, 2)])
def test_rank_rows_interleave_back_to_target_order(n, world):
    import torch

    from ft.engine.strategy import interleave, rank_rows

    x = torch.arange(n * 3).view(n, 3)
    parts = [x[rank_rows(n, r, world)] for r in range(world)]
    assert sorted(len(p) for p in parts)[-1] - sorted(len(p) for p in parts)[0] <= 1
    assert torch.equal(interleave(parts), x)
    assert torch.equal(interleave([p.T for p in parts], dim=1), x.T)


def test_several_devices_get_ft_strategy_and_one_device_keeps_its_own():
    from omegaconf import OmegaConf

    from ft.core.errors import ConfigError
    from ft.engine.strategy import IndependentRowsStrategy, choose_strategy

    cfg = OmegaConf.create
    assert choose_strategy(cfg({})) == "auto"
    assert choose_strategy(cfg({"devices": 1, "strategy": "single_device"})) == "single_device"
    assert choose_strategy(cfg({"devices": "auto"})) == "auto"
    for many in ({"devices": 2, "accelerator": "cpu"}, {"devices": [0, 1], "accelerator": "cpu", "strategy": "ddp"},
                 {"devices": 3, "accelerator": "cpu", "strategy": "ft_independent"}):
        s = choose_strategy(cfg(many))
        assert isinstance(s, IndependentRowsStrategy) and s.process_group_backend == "gloo"
    assert choose_strategy(cfg({"devices": 2, "accelerator": "gpu"})).process_group_backend is None
    assert choose_strategy(cfg({"devices": [0], "strategy": "ddp"})) == "ddp"  # one device in a list
    with pytest.raises(ConfigError, match="trainer.strategy='fsdp' with several devices or nodes; valid: auto, ddp"):
        choose_strategy(cfg({"devices": 2, "strategy": "fsdp"}))


def test_several_nodes_get_ft_strategy_and_their_rank():
    from omegaconf import OmegaConf

    from ft.engine.strategy import IndependentRowsStrategy, choose_strategy, node_process_rank

    cfg = OmegaConf.create({"devices": 1, "num_nodes": 2, "accelerator": "cpu", "strategy": "auto"})
    assert isinstance(choose_strategy(cfg), IndependentRowsStrategy)  # never stock DDP across nodes
    env = {"NODE_RANK": "1", "LOCAL_RANK": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k in ("RANK", "SLURM_PROCID"):
            mp.delenv(k, raising=False)
        for k, v in env.items():
            mp.setenv(k, v)
        assert node_process_rank(OmegaConf.create({"devices": 2, "num_nodes": 2})) == 3
        assert node_process_rank(OmegaConf.create({"devices": 2, "num_nodes": 1})) is None
        mp.setenv("SLURM_PROCID", "3")  # Slurm names the global rank: Lightning reads it itself
        assert node_process_rank(OmegaConf.create({"devices": 2, "num_nodes": 2})) is None


@pytest.mark.slow
def test_two_nodes_equal_one_process(tiny_dir, tmp_path):
    """Two CPU processes started as the two nodes of one job (NODE_RANK 0 and 1, one device each,
    trainer.num_nodes=2), as a multi-node launcher starts them: the result equals one process."""
    import os
    import random

    one = cli_run(tiny_dir, tmp_path / "one")
    port = str(random.Random(os.getpid()).randint(20000, 40000))
    cmd = [sys.executable, "-m", "ft.train", f"model.name_or_path={tiny_dir}", "trainer.max_steps=15",
           "trainer.accelerator=cpu", "target.per_layer=5", "logger.wandb.mode=disabled", "trainer.num_nodes=2",
           "trainer.devices=1", f"hydra.run.dir={tmp_path / 'nodes'}"]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "WORLD_SIZE")}
    procs = [subprocess.Popen(cmd, env={**base, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                        "NODE_RANK": str(node)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:  # a node whose peer failed waits for it forever: never leave one behind
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    two = read_targets(tmp_path / "nodes")
    assert list(one.sites) == list(two.sites)
    rel = ((one.objective - two.objective).abs() / one.objective.abs().clip(lower=1e-6)).max()
    assert rel <= 1e-4, rel
    a, b = read_inputs(tmp_path / "one"), read_inputs(tmp_path / "nodes")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
