"""Every supported family on a tiny random model: points equal hooks on the model's own modules,
gradients too, the lean forward equals the hooked one, and whole runs work (sweep, closest words,
report, examples)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from ft.model.encoder import load_encoder
from ft.model.fastforward import FastSiteReader, supports
from ft.model.sites import POINTS, SiteReader
from ft.rundir.results import read_inputs, read_targets
from ft.train import run
from tests.families import FAMILIES, build_family
from tests.test_train import compose_cfg

LEAN = ("bert", "roberta", "xlm-roberta", "camembert", "electra")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: build_family(root / f, f, seed=i) for i, f in enumerate(FAMILIES)}


def reference_points(model: torch.nn.Module, family: str, inputs_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
    """{point: [batch, layers, seq, width]} by forward hooks on the HF modules themselves (the
    FFN activation module, the FFN output projection, the layer) over a full forward pass."""
    pre = {"attn_ctx"}  # points read as a module's input
    if family == "distilbert":
        layers = list(model.transformer.layer)
        mods = {"ffn_act": lambda b: b.ffn.activation, "ffn_out": lambda b: b.ffn.lin2, "resid": lambda b: b}
        attn = lambda b: b.attention.out_lin  # noqa: E731
    elif family == "modernbert":  # act(input) * gate is the input of the MLP's dropout
        layers = list(model.layers)
        mods = {"ffn_act": lambda b: b.mlp.drop, "ffn_out": lambda b: b.mlp, "resid": lambda b: b}
        pre.add("ffn_act")
        attn = lambda b: b.attn.Wo  # noqa: E731
    elif family == "albert":  # one shared layer, applied num_hidden_layers times
        shared = model.encoder.albert_layer_groups[0].albert_layers[0]
        layers = [shared] * model.config.num_hidden_layers
        mods = {"ffn_act": lambda b: b.activation, "ffn_out": lambda b: b.ffn_output, "resid": lambda b: b}
        attn = lambda b: b.attention.dense  # noqa: E731
    else:
        layers = list(model.encoder.layer)
        mods = {"ffn_act": lambda b: b.intermediate, "ffn_out": lambda b: b.output.dense, "resid": lambda b: b}
        attn = lambda b: b.attention.output.dense  # noqa: E731
    mods.update(attn_ctx=attn, attn_out=attn)  # the attention's output projection: its input, its output
    store: dict[str, list[torch.Tensor]] = {p: [] for p in POINTS}
    handles = []
    for point, get in mods.items():
        for block in dict.fromkeys(layers):  # each module once: a shared one records every application
            def keep(_m, _i, out=None, point=point):
                t = _i[0] if point in pre else out
                store[point].append(t[0] if isinstance(t, tuple) else t)
            if point in pre:
                handles.append(get(block).register_forward_pre_hook(lambda m, i, keep=keep: keep(m, i)))
            else:
                handles.append(get(block).register_forward_hook(keep))
    try:
        model(inputs_embeds=inputs_embeds)
    finally:
        for h in handles:
            h.remove()
    assert all(len(v) == len(layers) for v in store.values())
    return {p: torch.stack(store[p], dim=1) for p in POINTS}


def framed(enc, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """[CLS] e_1..e_l [SEP] with random e in the word-embedding space."""
    g = torch.Generator().manual_seed(seed)
    W = enc.word_embeddings.detach()
    mid = torch.randn(n, length, W.shape[1], generator=g) * W.std()
    cls = W[enc.tokenizer.cls_token_id].expand(n, 1, -1)
    sep = W[enc.tokenizer.sep_token_id].expand(n, 1, -1)
    return torch.cat([cls, mid, sep], dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_points_and_gradients_equal_hooks_on_the_models_own_modules(family, family_dirs):
    enc = load_encoder(str(family_dirs[family]))
    model, L, pos = enc.model, enc.num_layers, 2
    x = framed(enc, 3, 3).requires_grad_(True)
    ref = reference_points(model, family, x)
    x2 = x.detach().clone().requires_grad_(True)
    got = SiteReader(model, POINTS, L - 1, pos).read(inputs_embeds=x2)
    g = torch.Generator().manual_seed(1)
    weights = {p: torch.randn(got[p].shape, generator=g) for p in POINTS}
    for p in POINTS:
        want = ref[p][:, :, pos]
        assert got[p].shape == want.shape
        assert (got[p] - want).abs().max() <= 1e-5 * want.abs().max(), (family, p)
    sum((ref[p][:, :, pos] * weights[p]).sum() for p in POINTS).backward()
    sum((got[p] * weights[p]).sum() for p in POINTS).backward()
    assert (x2.grad - x.grad).abs().max() <= 1e-5 * x.grad.abs().max(), family
    assert got["ffn_act"].shape[-1] == enc.arch.intermediate_size and got["resid"].shape[-1] == enc.hidden_size


@pytest.mark.parametrize("family", FAMILIES)
def test_the_lean_forward_is_used_where_it_is_exact(family, family_dirs):
    enc = load_encoder(str(family_dirs[family]))
    assert supports(enc.model) == (family in LEAN)
    if family not in LEAN:
        return
    x = framed(enc, 4, 2, seed=3)
    hooked = SiteReader(enc.model, POINTS, enc.num_layers - 1, 1).read(inputs_embeds=x)
    lean = FastSiteReader(enc.model, POINTS, enc.num_layers - 1, 1).read(inputs_embeds=x)
    for p in POINTS:
        assert (lean[p] - hooked[p]).abs().max() <= 1e-5 * hooked[p].abs().max(), (family, p)


@pytest.fixture(scope="module")
def family_runs(family_dirs, tmp_path_factory) -> dict[str, Path]:
    import os

    root = tmp_path_factory.mktemp("family_runs")
    old = os.environ.get("FT_CACHE_DIR")
    os.environ["FT_CACHE_DIR"] = str(root / "cache")
    try:
        for family, d in family_dirs.items():
            cfg = compose_cfg([f"model.name_or_path={d}", "trainer.max_steps=20", "target.per_layer=2",
                               "logger.wandb.mode=disabled", "+trainer.enable_progress_bar=false",
                               "engine.curve_every=1", f"run_name={family}"])
            run(cfg, root / family)
    finally:
        os.environ.pop("FT_CACHE_DIR") if old is None else os.environ.update(FT_CACHE_DIR=old)
    return {f: root / f for f in family_dirs}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_run_raises_the_objective_and_measures_it_like_the_model_does(family, family_dirs, family_runs):
    enc = load_encoder(str(family_dirs[family]))
    d = family_runs[family]
    df, tensors = read_targets(d), read_inputs(d)
    curves = pd.read_parquet(d / "curves.parquet").groupby("step").objective.mean()
    assert curves.iloc[-1] > curves.iloc[0]
    E = enc.embedding_size
    assert tensors["embeds"].shape == (len(df), 1, E) and tensors["analysis"].shape == (len(df), 1, E)
    W = enc.word_embeddings.detach()
    n = len(df)
    seq = torch.cat([W[enc.tokenizer.cls_token_id].expand(n, 1, -1), tensors["embeds"],
                     W[enc.tokenizer.sep_token_id].expand(n, 1, -1)], dim=1)
    with torch.no_grad():
        ref = reference_points(enc.model, family, seq)
        special = set(enc.tokenizer.all_special_ids)
        words = torch.tensor([i for i in range(len(W)) if i not in special])
        ids = torch.stack([torch.full_like(words, enc.tokenizer.cls_token_id), words,
                           torch.full_like(words, enc.tokenizer.sep_token_id)], dim=1)
        brute = reference_points(enc.model, family, W[ids])
    tokens = enc.tokenizer.convert_ids_to_tokens(words.tolist())
    for i, row in enumerate(df.itertuples()):
        [site] = row.sites
        layer, point, unit = site.split(".")[1], site.split(".")[2], int(site.split(".")[3])
        assert row.objective == pytest.approx(float(ref[point][i, int(layer), 1, unit]), rel=1e-4, abs=1e-5)
        best = brute[point][:, int(layer), 1, unit]
        assert row.most_activating_word == tokens[int(best.argmax())]
        assert row.most_activating_word_activation == pytest.approx(float(best.max()), rel=1e-4, abs=1e-5)
        assert len(row.closest_words) == 20 and not set(row.closest_words) & set(enc.tokenizer.all_special_tokens)


def test_report_and_examples_work_on_every_family(family_runs, tmp_path):
    from ft.cli.report import build_report
    from ft.examples import main as examples

    html = build_report([str(p) for p in family_runs.values()], tmp_path / "r.html", words=50).read_text()
    for family in FAMILIES:
        assert f">{family}<" in html  # the run's label (its run_name) in the tables
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The cat sat on the sofa. A dog ran to the river bank. Music and piano in the house.\n" * 3)
    for family in ("roberta", "distilbert", "electra", "deberta-v2", "modernbert", "albert"):
        assert examples([str(family_runs[family]), "--corpus", str(corpus), "--top-n", "2",
                         "--substitutes", "2", "--mlm", "nearest"]) == 0
        ex = pd.read_parquet(family_runs[family] / "examples.parquet")
        ids = set(read_targets(family_runs[family]).target_id)
        assert {"sentence", "mae"} <= set(ex.kind) and set(ex.target_id) == ids


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_ft_train_runs_each_family_from_its_directory(family, family_dirs, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ft.train", f"model.name_or_path={family_dirs[family]}",
                           "trainer.max_steps=5", "target.per_layer=1", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_targets(tmp_path / "run")) == load_encoder(str(family_dirs[family])).num_layers  # one per layer


@pytest.mark.parametrize("experiment", ["default", "group_k10"])
def test_a_streamed_vocabulary_gives_the_same_run_as_the_full_table(experiment, tiny_dir, tmp_path):
    """engine.sweep_budget_mb below the table's size: the sweep is streamed (group selection, word
    statistics) and the run is the same as with the whole table in memory."""
    from tests.test_train import tiny_overrides

    base = tiny_overrides(tiny_dir, experiment, 6) + ["logger.wandb.mode=disabled", "cache=false"]
    run(compose_cfg(base), tmp_path / "table")
    run(compose_cfg(base + ["engine.sweep_budget_mb=0.001"]), tmp_path / "stream")
    a, b = read_targets(tmp_path / "table"), read_targets(tmp_path / "stream")
    assert [list(s) for s in a.sites] == [list(s) for s in b.sites]
    assert list(a.most_activating_word) == list(b.most_activating_word)
    for col in ("objective", "most_activating_word_activation"):
        assert (a[col] - b[col]).abs().max() <= 1e-5 * a[col].abs().max()
    if experiment.startswith("group"):
        assert (a.target_word_activation - b.target_word_activation).abs().max() <= 1e-5


@pytest.mark.slow
def test_an_xlmr_sized_vocabulary_runs_within_4_gb(tmp_path):
    """250,002 tokens: the default experiment through the CLI; peak RSS of the run measured."""
    import resource

    from tests.families import build_large_vocab

    d = build_large_vocab(tmp_path / "xlmr")
    for budget in ("2048", "16"):  # the table kept (128 MB), and streamed
        proc = subprocess.run([sys.executable, "-m", "ft.train", f"model.name_or_path={d}", "trainer.max_steps=10",
                               "target.per_layer=2", f"engine.sweep_budget_mb={budget}",
                               f"hydra.run.dir={tmp_path / budget}"],
                              capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        df = read_targets(tmp_path / budget)
        assert len(df) == 4 and df.most_activating_word.notna().all()
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"peak RSS of the 250,002-token runs: {peak_gb:.2f} GB")
    assert peak_gb < 4.0
    a, b = read_targets(tmp_path / "2048"), read_targets(tmp_path / "16")
    assert list(a.most_activating_word) == list(b.most_activating_word)


@pytest.mark.parametrize("family", FAMILIES)
def test_ffn_weights_map_ffn_act_to_ffn_out(family, family_dirs):
    """The adapter's FFN weights are the ones the model uses: W_out · ffn_act + b_out = ffn_out, and
    W_in has the FFN's input shape."""
    enc = load_encoder(str(family_dirs[family]))
    x = framed(enc, 2, 2, seed=5)
    got = SiteReader(enc.model, POINTS, enc.num_layers - 1, 1).read(inputs_embeds=x)
    for layer in range(enc.num_layers):
        w_in, b_in, w_out, b_out = enc.arch.ffn_weights(layer)
        assert w_in.shape == ((2 if enc.arch.gated else 1) * enc.arch.intermediate_size, enc.hidden_size)
        assert w_out.shape == (enc.hidden_size, enc.arch.intermediate_size)
        out = got["ffn_act"][:, layer] @ w_out.T + (0 if b_out is None else b_out)
        assert (out - got["ffn_out"][:, layer]).abs().max() <= 1e-5 * got["ffn_out"].abs().max()


@pytest.mark.parametrize("family,head", [("bert", "BertForSequenceClassification"), ("roberta", "RobertaForMaskedLM"),
                                         ("electra", "ElectraForTokenClassification")])
def test_a_fine_tuned_checkpoint_runs_on_its_encoder_and_keeps_its_head(family, head, family_dirs, tmp_path):
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    torch.manual_seed(7)
    cfg = AutoConfig.from_pretrained(family_dirs[family])
    cfg.num_labels = 3
    model = getattr(transformers, head)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    d = tmp_path / "finetuned"
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(family_dirs[family]).save_pretrained(d)
    enc = load_encoder(str(d))
    assert type(enc.head).__name__ == head and enc.model is enc.head.base_model
    x = framed(enc, 2, 2)
    ref = reference_points(enc.model, family, x)
    got = SiteReader(enc.model, POINTS, enc.num_layers - 1, 1).read(inputs_embeds=x)
    for p in POINTS:
        assert (got[p] - ref[p][:, :, 1]).abs().max() <= 1e-5 * ref[p].abs().max()
    out = tmp_path / "run"
    run(compose_cfg([f"model.name_or_path={d}", "trainer.max_steps=20", "target.per_layer=2", "engine.curve_every=1",
                     "logger.wandb.mode=disabled", "+trainer.enable_progress_bar=false"]), out)
    curves = pd.read_parquet(out / "curves.parquet").groupby("step").objective.mean()
    assert curves.iloc[-1] > curves.iloc[0]
    if head.endswith("ForMaskedLM"):  # ft.examples --mlm auto uses the checkpoint's own head
        from ft.examples import main as examples

        corpus = tmp_path / "corpus.txt"
        corpus.write_text("The cat sat on the sofa. A dog ran to the river bank. Music and piano in the house.\n")
        assert examples([str(out), "--corpus", str(corpus), "--top-n", "1", "--substitutes", "2"]) == 0
        ex = pd.read_parquet(out / "examples.parquet")
        used = set(ex.substitutes_from) - {""}  # "" on rows that are not from local search
        assert used == {f"mlm:{d}"}, used


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_bench_runs_on_every_family_and_agrees_with_the_naive_loop(family, family_dirs, capsys):
    from ft.bench import main as bench

    out = bench(["--model", str(family_dirs[family]), "--steps", "4", "--naive-per-layer", "1", "--no-bert-base",
                 "--report-runs", "0", "--lr", "1.0", "--fraction", "0.25"])
    r = out["results"]["minilm"]
    assert r["model_type"] == family and r["reader"] == ("lean" if family in LEAN else "hooked")
    assert out["max_rel_diff_vs_naive"] <= 1e-3 and out["neuron_steps_per_s"] > 0


def fits(model: torch.nn.Module, length: int) -> bool:
    """Whether Hugging Face's own forward takes `length` tokens (an absolute position table raises
    for longer inputs)."""
    try:
        with torch.no_grad():
            model(input_ids=torch.full((1, length), 5))
        return True
    except (IndexError, RuntimeError, ValueError):
        return False


@pytest.mark.parametrize("family,flags", [*((f, {}) for f in FAMILIES),
                                          ("deberta-v2", {"position_biased_input": True}),
                                          ("deberta-v2", {"position_biased_input": False})])
def test_max_tokens_is_the_longest_input_the_model_takes(family, flags):
    """Every adapter's `max_tokens` against the model itself: it takes `max_tokens` tokens and
    refuses one more; None means it takes far longer inputs (relative or rotary positions). DeBERTa
    has an absolute table exactly when `position_biased_input` is true."""
    from transformers import AutoModel

    from ft.model.arch import adapter_class
    from tests.families import family_config

    cfg = family_config(family, 60, 1)
    for key, value in flags.items():
        setattr(cfg, key, value)
    model = AutoModel.from_config(cfg, attn_implementation="eager").eval()
    n = adapter_class(cfg).max_tokens(cfg)
    if n is None:
        assert fits(model, 3 * getattr(cfg, "max_position_embeddings", 64)), family
    else:
        assert fits(model, n) and not fits(model, n + 1), (family, n)
