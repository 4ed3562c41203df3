"""The cost planner: its FLOPs are the engine's own count for the same targets, from a config.json
alone; the shipped large-encoder shapes all plan."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from ft.core.errors import ConfigError
from ft.engine.plan import MODELS_DIR, plan, step_flops


def test_planned_flops_are_the_engines_count(tiny, tiny_dir, tmp_path):
    """The planner on the tiny BERT's config.json (a meta model) counts what the engine's module
    counts for the same ffn_act targets on the real model."""
    from ft.engine.module import TextualizationModule
    from ft.inputs import build_input
    from ft.model.sites import Site
    from ft.model.vocab import Vocabulary

    cfg = json.loads((tiny_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    n = 7
    p = plan(tmp_path / "config.json", targets=n, steps=10, cpu_gflops=10.0)
    per_layer = [n // 2 + (1 if j < n % 2 else 0) for j in range(2)]
    sites = [[Site(j, "ffn_act", u)] for j, k in enumerate(per_layer) for u in range(k)]
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    inputs = build_input("embedding", range(n), tiny.word_embeddings, seed=0, length=1)
    module = TextualizationModule(tiny.model, sites, inputs, partial(torch.optim.Adam, lr=0.1), vocab.cls_id,
                                  vocab.sep_id)
    assert p.flops_per_neuron_step * n == pytest.approx(module.step_flops(1), rel=1e-9)
    assert p.cpu_hours * 3600 == pytest.approx(10 * module.step_flops(1) / (10e9 * 0.82), rel=1e-9)
    assert p.targets == n and p.lean and p.layers == 2


@pytest.mark.parametrize("path", sorted(MODELS_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_shape_plans_without_weights(path):
    raw = json.loads(path.read_text())
    p = plan(path, steps=1000, cpu_gflops=100.0)
    assert (p.layers, p.hidden) == (raw["num_hidden_layers"], raw["hidden_size"])
    assert p.targets == raw["num_hidden_layers"] * raw["intermediate_size"]
    assert p.flops_per_neuron_step > 0 and p.memory_per_row_mb > 0
    assert p.gpus[8] <= p.gpu_hours and p.gpu_hours < p.cpu_hours


def test_the_hooked_forward_costs_more_than_the_lean_one():
    from ft.engine.plan import meta_model

    model, _ = meta_model(MODELS_DIR / "bert_large_uncased.json")
    lean, is_lean = step_flops(model, 240)
    from ft.model.sites import hooked_step_flops

    hooked = sum(hooked_step_flops(model, 10, j, 1) for j in range(24)) + 2 * 240 * 1024 * 1024
    assert is_lean and lean < hooked


def test_a_bad_config_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file; valid: a model's config.json, e.g. one of"):
        plan(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="not a model config.json"):
        plan(bad)


def test_the_bench_cli_prints_the_plan(capsys):
    from ft.bench import main

    out = main(["--plan", str(Path(MODELS_DIR) / "bert_base_uncased.json"), "--targets", "1200", "--steps", "50"])
    text = capsys.readouterr().out
    assert "bert-base-uncased" in text and "assumptions:" in text and "64 GPUs" in text
    assert out["targets"] == 1200 and out["steps"] == 50
    assert json.loads(text.strip().splitlines()[-1])["targets"] == 1200
