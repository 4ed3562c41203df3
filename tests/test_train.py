"""End to end: Hydra config -> run() -> run directory, W&B offline run, CLI errors."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from ft.cli.hydra_conf import CONFIG_DIR
from ft.rundir.results import find_runs, read_config, read_inputs, read_summary, read_targets
from ft.train import run

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


def tiny_overrides(tiny_dir: Path, experiment: str, steps: int = 4) -> list[str]:
    o = [f"experiment={experiment}", f"model.name_or_path={tiny_dir}",
         f"trainer.max_steps={steps}", "trainer.accelerator=cpu",
         "+trainer.enable_progress_bar=false", "callbacks.nearest.every_n_steps=2"]
    if experiment.startswith("group"):
        o += ["target.k=8", "target.num_random=4", "target.num_frequent=2"]
    elif experiment == "default":
        o += ["target.per_layer=2"]
    elif experiment == "sae_demo":
        o += ["target.demo.steps=100"]
    return o


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_every_experiment_is_listed():
    expected = {"default", "single_neurons"} | {
        f"group_k{k}{s}" for k in (10, 100, 250, 450) for s in ("", "_abs")}
    assert expected <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", [pytest.param(e, marks=pytest.mark.slow) if e == "sae_demo" else e
                                        for e in EXPERIMENTS])  # sae_demo trains an SAE on the corpus first
def test_experiment_smoke(experiment, tiny_dir, tmp_path):
    cfg = compose_cfg(tiny_overrides(tiny_dir, experiment))
    summary = run(cfg, tmp_path / "run")
    df = read_targets(tmp_path / "run")
    assert summary["final/num_targets"] == len(df) > 0
    assert read_config(tmp_path / "run").experiment_name == experiment
    if experiment.startswith("group"):
        assert df.kind.eq("group").all() and df.k.eq(8).all()
        assert df.selection.eq("absolute" if experiment.endswith("_abs") else "relative").all()
        assert len(df) == 6 and "group/target_top20_rate" in summary
    elif experiment == "sae_demo":  # trained for the tiny model, then its latents textualized, with examples
        from ft.targets.sae_file import load_sae

        sae = load_sae(df.sae_path[0])
        assert sae.d_sae == 4 * 32 and df.kind.eq("sae").all() and len(df) == 20 and set(df.layer) == {1}
        assert 0 < summary["sae/l0"] <= sae.d_sae and summary["sae/explained_variance"] <= 1
        ex = pd.read_parquet(tmp_path / "run" / "examples.parquet")
        assert set(ex.target_id) == set(df.target_id) and (ex.kind == "sentence").any()
        return
    else:
        assert df.kind.eq("neuron").all() and set(df.layer) == {0, 1}
    assert_values_hold(df, read_inputs(tmp_path / "run"), summary, tiny_dir)


def assert_values_hold(df, tensors, summary, model_dir, max_steps: int = 4) -> None:
    """Values, not names: the saved inputs reproduce `objective` by plain HF hooks; the summary
    is the table's aggregate; flags agree with the columns they summarize."""
    from transformers import BertModel, BertTokenizerFast

    from tests.reference import frame, hf_points, site_mean

    model = BertModel.from_pretrained(str(model_dir)).eval()
    tok = BertTokenizerFast.from_pretrained(str(model_dir))
    acts = hf_points(model, inputs_embeds=frame(model, tok, tensors["embeds"]))
    for row in df.itertuples():
        assert row.objective == pytest.approx(float(site_mean(acts, row.sites, 1)[row.Index]), rel=1e-4, abs=1e-5)
        assert row.closest_is_most_activating == (row.closest_words[0] == row.most_activating_word)
        assert list(row.closest_cos) == sorted(row.closest_cos, reverse=True) and len(row.closest_words) == 20
        assert 0 < row.steps <= max_steps
        assert row.analysis_norm == pytest.approx(float(tensors["analysis"][row.Index, 0].norm()), rel=1e-5)
        if row.kind == "group":
            assert len(set(row.sites)) == row.k and row.most_activating_word_activation >= row.target_word_activation
            assert (row.target_in_top1, row.target_in_top20) == (row.target_word_rank == 1, row.target_word_rank <= 20)
    ok = df[~df.diverged]
    assert summary["final/activation_mean"] == pytest.approx(ok.objective.mean(), rel=1e-5)
    assert summary["final/activation_ratio"] == pytest.approx(
        ok.objective.mean() / ok.most_activating_word_activation.mean(), rel=1e-5)
    assert set(CONTRACT) <= set(df.columns) and all(c == c.lower() for c in df.columns)
    first = ok.closest_cos.map(lambda c: c[0])
    for layer, d in ok[ok.kind == "neuron"].groupby("layer"):  # Figs. 2-4 per layer
        assert summary[f"layer_{layer}/activation_mean"] == pytest.approx(d.objective.mean(), rel=1e-5)
        assert summary[f"layer_{layer}/maw_activation_mean"] == pytest.approx(
            d.most_activating_word_activation.mean(), rel=1e-5)
        assert summary[f"layer_{layer}/closest_cos_mean"] == pytest.approx(first[d.index].mean(), rel=1e-5)
    groups = ok[ok.kind == "group"]
    if len(groups):  # Tables 3-4
        for key, col in (("target_top1_rate", "target_in_top1"), ("target_top20_rate", "target_in_top20"),
                         ("target_cos_mean", "target_word_cos"),
                         ("target_word_activation_mean", "target_word_activation")):
            assert summary[f"group/{key}"] == pytest.approx(groups[col].astype(float).mean(), rel=1e-5, abs=1e-7)


CONTRACT = ("target_id kind sites layer target_word k selection objective most_activating_word "
            "most_activating_word_activation target_word_activation closest_words closest_cos "
            "closest_is_most_activating target_word_cos target_word_rank target_in_top1 "
            "target_in_top20 analysis_norm raw_norm steps converged diverged").split()


def run_isolated(cfg, run_dir: Path, cache_root: Path) -> dict:
    """`run` for module-scoped fixtures, which the per-test isolation fixture does not reach:
    its own cache, W&B offline."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FT_CACHE_DIR", str(cache_root / "cache"))
        mp.setenv("WANDB_MODE", "offline")
        return run(cfg, run_dir)


@pytest.fixture(scope="module")
def group_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("grouprun")
    cfg = compose_cfg(tiny_overrides(tiny_dir, "group_k10", steps=30) + ["target.words=[sofa,river,piano]"])
    return out / "run", run_isolated(cfg, out / "run", out)


def test_run_directory_contract(group_run, tiny_dir):
    run_dir, summary = group_run
    assert find_runs([run_dir.parent]) == [run_dir]
    df = read_targets(run_dir)
    columns = ("target_id kind sites layer target_word k selection objective most_activating_word "
               "most_activating_word_activation target_word_activation closest_words closest_cos "
               "closest_is_most_activating target_word_cos target_word_rank target_in_top1 "
               "target_in_top20 analysis_norm raw_norm steps converged diverged").split()
    assert set(columns) <= set(df.columns)
    assert list(df.target_word) == ["sofa", "river", "piano"]
    assert all(len(c) >= 8 for c in df.sites)
    assert all(list(c) == sorted(c, reverse=True) for c in df.closest_cos)
    t = read_inputs(run_dir)
    assert t["embeds"].shape == t["analysis"].shape == (3, 1, 32)
    assert read_summary(run_dir) == pytest.approx(summary)
    assert not list(run_dir.glob(".*.tmp"))
    assert_values_hold(df, t, summary, tiny_dir, max_steps=30)


def test_saved_embeds_reproduce_objective(group_run, tiny):
    """Feeding [CLS] embeds [SEP] back through the encoder reproduces `objective`."""
    run_dir, _ = group_run
    df, t = read_targets(run_dir), read_inputs(run_dir)
    W = tiny.word_embeddings
    cls, sep = tiny.tokenizer.cls_token_id, tiny.tokenizer.sep_token_id
    e = t["embeds"]
    seq = torch.cat([W[cls].expand(len(e), 1, -1), e, W[sep].expand(len(e), 1, -1)], 1)
    out = tiny.model(inputs_embeds=seq, output_hidden_states=True)
    for row in df.itertuples():
        vals = []
        for s in row.sites:
            layer, unit = int(s.split(".")[1]), int(s.split(".")[3])
            blk = tiny.model.encoder.layer[layer]
            attn = blk.attention(out.hidden_states[layer][row.target_id : row.target_id + 1])[0]
            vals.append(blk.output.dense(blk.intermediate(attn))[0, 1, unit])
        assert row.objective == pytest.approx(float(sum(vals) / len(vals)), rel=1e-3)


def test_activation_rises_in_a_real_run(group_run):
    run_dir, _ = group_run
    metrics = (run_dir / "csv").rglob("metrics.csv")
    import pandas as pd

    hist = pd.read_csv(next(metrics)).dropna(subset=["act/mean"])
    assert hist["act/mean"].iloc[-1] > hist["act/mean"].iloc[0]


def test_wandb_offline_run_reads_back(group_run):
    run_dir, summary = group_run
    [wandb_file] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    wandb = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb), "leet", "inspect", "--summary", "--json", str(wandb_file)],
                         capture_output=True, text=True, timeout=120, check=True)
    info = json.loads(out.stdout)
    assert info["project"] == "ft" and info["state"] == "finished"
    assert info["config"]["experiment_name"] == "group_k10"
    s = info["summary"]
    assert s["final/activation_mean"] == pytest.approx(summary["final/activation_mean"])
    assert s["results/targets"]["nrows"] == 3 and s["nearest/words"]["_type"] == "table-file"
    records = subprocess.run([str(wandb), "leet", "inspect", "--json", str(wandb_file)],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    history = [json.loads(line)["history"]["item"] for line in records.splitlines()
               if '"type":"history"' in line]
    curve = [h["act/mean"] for h in history if "act/mean" in h]
    assert len(curve) >= 3 and curve[-1] > curve[0]  # the activation curve, not just a file


@pytest.mark.parametrize("override,message", [
    ("target.sites=[layer.9.ffn_out.0]", "layer 9 out of range; valid 0..1"),
    ("target.sites=[layer.0.ffn_out.99]", "unit 99 out of range for ffn_out; valid 0..31"),
    ("target.sites=[layer0.ffn_out.1]", "site 'layer0.ffn_out.1' does not parse"),
    ("experiment=group_k10 target.words=[zebra]", "'zebra' is not in the vocabulary"),
    ("experiment=group_k10 target.words=[sofa] target.k=1000", "target.k=1000; valid 1..64"),
])
@pytest.mark.slow
def test_cli_bad_input_is_one_line_error(override, message, tiny_dir, tmp_path):
    run_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "ft.train", f"model.name_or_path={tiny_dir}",
           f"hydra.run.dir={run_dir}", *override.split()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert not (run_dir / "targets.parquet").exists()


def test_unknown_group_option_names_the_valid_ones():
    from ft.cli.preflight import PreflightError, check_choices

    check_choices(["experiment=default", "input=onehot", "scheduler=null", "trainer.max_steps=3", "+tags=[a]"])
    for arg, valid in (("experiment=nope", "atlas, default, group_k10"), ("+optim=rmsprop", "adam, paper_sgd, sgd")):
        key, value = arg.lstrip("+").split("=")
        with pytest.raises(PreflightError, match=f"^{key}={value!r} is not an option; valid: {valid}"):
            check_choices([arg])


def test_run_name_is_the_experiment_and_the_key_overrides():
    from ft.cli.run import run_name_from_overrides

    name = run_name_from_overrides("group_k10", ["experiment=group_k10", "optim.lr=0.5", "hydra.run.dir=x",
                                                 "+hydra.job.name=y", "seed=3"])
    assert name == "group_k10-optim.lr=0.5-seed=3"
    assert run_name_from_overrides("e", [f"target.words=[{'w' * 300}]"]) == ("e-target.words=[" + "w" * 300)[:128]


def test_keep_best_keeps_the_best_input_seen_and_remeasures_it(tiny_dir, tmp_path):
    """Adam at lr 2 with a strong norm penalty: the objective rises, then falls (planted). keep=best
    keeps each target's best input; its objective is re-measured by a fresh forward of the saved input."""
    import pandas as pd

    out = {}
    for keep in ("last", "best"):
        cfg = compose_cfg(tiny_overrides(tiny_dir, "default", 40) + [
            "logger.wandb.mode=disabled", "optim.lr=2", "reg.norm=1", "engine.curve_every=1",
            "engine.stop_when_converged=false", f"engine.keep={keep}"])
        summary = run(cfg, tmp_path / keep)
        out[keep] = (read_targets(tmp_path / keep), pd.read_parquet(tmp_path / keep / "curves.parquet"))
    last, (best, curves) = out["last"][0], out["best"]
    assert_values_hold(best, read_inputs(tmp_path / "best"), summary, tiny_dir, max_steps=40)
    assert (best.objective >= last.objective - 1e-5).all()
    assert (best.objective > last.objective + 1e-3).any()  # the planted fall happened and was undone
    seen = curves.pivot(index="step", columns="target_id", values="objective")
    for row, lrow in zip(best.itertuples(), last.itertuples(), strict=True):
        if row.kept_step < row.steps:  # an input from during the run: the curve's maximum, at that step
            assert row.objective == pytest.approx(seen[row.target_id].max(), rel=1e-3, abs=1e-5)
            assert seen[row.target_id].idxmax() == row.kept_step
        else:  # the last input was the best
            assert row.objective == pytest.approx(lrow.objective, rel=1e-4, abs=1e-6)
            assert row.objective >= seen[row.target_id].max() - 1e-5
    assert (last.kept_step == last.steps).all()


@pytest.mark.slow
def test_a_run_prints_one_bar_a_table_and_no_third_party_chatter(tiny_dir, tmp_path):
    """Redirected output (no terminal): the step bar a few times, the end table, where W&B's run
    is; no W&B banner or history, no Lightning tips, no epoch bar. log_level=debug brings them back."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    base = [sys.executable, "-m", "ft.train", f"model.name_or_path={tiny_dir}", "trainer.max_steps=40",
            "target.per_layer=2", f"hydra.run.dir={tmp_path / 'run'}"]
    quiet = subprocess.run(base, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    both = quiet.stdout + quiet.stderr
    for chatter in ("wandb:", "Tip", "GPU available", "Epoch 0", "v_num", "anonymous", "Loading weights"):
        assert chatter not in both, (chatter, both[-3000:])
    updates = quiet.stderr.replace("\r", "\n").count("textualizing:")
    assert 1 <= updates <= 4, quiet.stderr  # made, (maybe one 30 s update,) the end
    assert "40/40" in quiet.stderr and "moving=" in quiet.stderr and "act=" in quiet.stderr
    assert "targets converged" in quiet.stdout and "W&B run (offline):" in quiet.stdout
    debug = subprocess.run([*base, "log_level=debug", f"hydra.run.dir={tmp_path / 'run2'}"], capture_output=True,
                           text=True, timeout=300, env=env, cwd=tmp_path)
    assert debug.returncode == 0 and "wandb:" in debug.stdout + debug.stderr
