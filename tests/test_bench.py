"""`python -m ft.bench`: bad arguments are refused before anything loads; on the tiny model the
benchmark's engine agrees with its naive loop and its figures add up."""

import pytest
import torch

from ft.bench import main


@pytest.mark.parametrize("argv,named", [
    (["--steps", "1"], "--steps=1"),
    (["--bert-base-steps", "0"], "--bert-base-steps=0"),
    (["--fraction", "0"], "--fraction=0.0"),
    (["--fraction", "1.5"], "--fraction=1.5"),
    (["--accelerator", "tpu"], "invalid choice: 'tpu'"),
    (["--rounds", "0"], "--rounds=0"),
])
def test_bad_arguments_name_the_value(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert named in err and ("valid" in err or "choose from" in err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_asked_for_without_one(capsys):
    with pytest.raises(SystemExit):
        main(["--accelerator", "gpu"])
    assert "--accelerator=gpu" in capsys.readouterr().err


def test_bench_model_agrees_with_the_naive_loop_over_rounds(tiny, capsys):
    """The engine's finals equal the naive loop's on the common neurons, every round's steps
    are timed, every naive neuron runs once, split around the engine rounds, and progress
    goes to stderr."""
    from ft.bench import bench_model

    steps, rounds = 4, 2
    out = bench_model("tiny", tiny, steps, naive_per_layer=2, lr=1.0, chunk_size=64, bf16=False,
                      fraction=0.2, rounds=rounds)
    assert out["max_rel_diff_vs_naive"] < 1e-3
    assert out["naive_neurons"] == 2 * tiny.num_layers
    assert out["engine_timed_steps"] == rounds * (steps - 1)
    rate = out["targets"] * out["engine_timed_steps"] / out["engine_seconds"]
    assert out["neuron_steps_per_s"] == pytest.approx(rate)
    assert out["speedup_vs_naive"] == pytest.approx(rate / out["naive_neuron_steps_per_s"])
    assert out["naive_neuron_steps_per_s"] == pytest.approx(
        out["naive_neurons"] * steps / out["naive_seconds"])
    assert out["flop_efficiency"] == pytest.approx(out["achieved_gflops"] / out["matmul_gflops"])
    # the FLOPs behind achieved_gflops are the engine's per-step formula for these targets
    from ft.bench import engine_flops, run_engine
    from ft.targets import neuron_targets

    flops_step = out["achieved_gflops"] * 1e9 * out["engine_seconds"] / out["engine_timed_steps"]
    sites = [t.sites for t in neuron_targets(tiny.model, fraction=0.2, seed=0)]
    module, _ = run_engine(tiny, sites, 2, 1.0, "32-true", 64, torch.device("cpu"))
    assert flops_step == pytest.approx(engine_flops(module, tiny.model.config), rel=1e-9)
    assert out["targets"] == module.num_targets and out["peak_rss_mb"] > 0
    captured = capsys.readouterr()
    assert f"engine round {rounds}/{rounds}" in captured.err and "[ft.bench]" not in captured.out


def test_compare_backward_runs_both_backwards_on_the_same_trajectory(tiny):
    """--compare-backward: the autograd-backward fits reach the same finals, are timed over the
    same steps, and their FLOPs are the autograd path's (more: the top layer's full query gradient)."""
    from ft.bench import bench_model, engine_flops, hand_backward, run_engine
    from ft.targets import neuron_targets

    steps = 4
    out = bench_model("tiny", tiny, steps, naive_per_layer=1, lr=1.0, chunk_size=64, bf16=False,
                      fraction=0.2, rounds=1, compare_backward=True)
    a = out["autograd_backward"]
    assert a["max_rel_diff_vs_hand"] < 1e-5 and a["max_rel_diff_vs_naive"] < 1e-3
    assert a["hand_speedup"] == pytest.approx(out["neuron_steps_per_s"] / a["neuron_steps_per_s"])
    assert a["flop_efficiency"] == pytest.approx(a["achieved_gflops"] / out["matmul_gflops"])
    sites = [t.sites for t in neuron_targets(tiny.model, fraction=0.2, seed=0)]
    module, _ = run_engine(tiny, sites, 2, 1.0, "32-true", 64, torch.device("cpu"))
    with hand_backward(False):
        autograd_flops = engine_flops(module)
    assert autograd_flops > engine_flops(module)
    seconds = out["targets"] * (steps - 1) / a["neuron_steps_per_s"]
    assert a["achieved_gflops"] * 1e9 * seconds / (steps - 1) == pytest.approx(autograd_flops, rel=1e-9)
