"""Robustness: resume after SIGKILL, locks, divergence, clear errors, no secrets, no pickle."""

import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ft.core.errors import FtError
from ft.engine.module import TextualizationModule
from ft.inputs import build_input
from ft.model.sites import POINTS, Site
from ft.model.vocab import Vocabulary
from ft.rundir.results import RunLock, read_targets
from ft.train import run
from tests.test_train import compose_cfg, tiny_overrides


@given(layer=st.integers(0, 10**6), point=st.sampled_from(POINTS), unit=st.integers(0, 10**6))
def test_site_grammar_round_trip(layer, point, unit):
    site = Site(layer, point, unit)
    assert Site.parse(str(site)) == site and str(Site.parse(str(site))) == str(site)


@given(st.text(max_size=30))
def test_site_parse_never_crashes(text):
    try:
        site = Site.parse(text)
    except FtError as e:
        assert "site" in str(e)
    else:
        assert str(site) == text.strip()


def cli(tiny_dir, run_dir, *extra):
    return [sys.executable, "-m", "ft.train", f"model.name_or_path={tiny_dir}", "trainer.max_steps=400",
            "target.per_layer=3", "engine.checkpoint_every_n_steps=25", "engine.stop_when_converged=false",
            "+trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", *extra]


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tiny_dir, tmp_path):
    # a fresh job: not attached to the W&B service that earlier in-process tests started
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {"WANDB_MODE": "offline"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli(tiny_dir, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, as a scheduler kills it ...
    proc.wait()
    # ... W&B's service included (it runs in a session of its own and names its parent's pid)
    subprocess.run(["pkill", "-KILL", "-f", f"wandb-core .*--pid {proc.pid}$"], check=False)
    assert ckpt.exists() and not (killed / "targets.parquet").exists(), "killed too late or too early"
    first_id = (killed / "wandb_id").read_text()
    done = subprocess.run(cli(tiny_dir, killed), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout + done.stderr
    straight = tmp_path / "straight"
    ref = subprocess.run(cli(tiny_dir, straight), env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    a, b = read_targets(killed), read_targets(straight)
    assert (a.steps == 400).all() and (b.steps == 400).all()
    rel = ((a.objective - b.objective).abs() / b.objective.abs().clip(lower=1e-6)).max()
    assert rel <= 1e-4, rel
    # the W&B run resumed (same id) instead of starting a second one
    assert (killed / "wandb_id").read_text() == first_id
    assert {p.name.rsplit("-", 1)[-1] for p in killed.glob("wandb/offline-run-*")} == {first_id}


def test_concurrent_runs_never_share_a_directory(tmp_path):
    with RunLock(tmp_path), pytest.raises(FtError, match="in use by process"):
        with RunLock(tmp_path):
            pass
    (tmp_path / ".lock").write_text("999999999@" + os.uname().nodename)  # a killed run's lock
    with RunLock(tmp_path):
        pass
    assert not (tmp_path / ".lock").exists()


def test_a_diverging_target_is_marked_and_the_others_go_on(tiny, tmp_path):
    import pytorch_lightning as pl

    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    sites = [[Site(0, "ffn_out", 1)], [Site(1, "ffn_out", 2)]]
    inputs = build_input("embedding", [0, 1], tiny.word_embeddings)
    with torch.no_grad():
        inputs.e[1] = float("nan")
    m = TextualizationModule(tiny.model, sites, inputs, partial(torch.optim.Adam, lr=0.1), vocab.cls_id,
                             vocab.sep_id, stop_when_converged=False)
    pl.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               default_root_dir=str(tmp_path)).fit(m)
    assert m.state.diverged.tolist() == [False, True]
    assert torch.isfinite(m.inputs.e[0]).all() and int(m.state.steps_per_row()[0]) == 10


def test_all_diverged_is_an_error_not_a_table(tiny_dir, tmp_path):
    extra = ["optim=sgd", "optim.lr=1e30", "logger.wandb.mode=disabled"]
    cfg = compose_cfg(tiny_overrides(tiny_dir, "default", 5) + extra)
    with pytest.raises(FtError, match="diverged.*lower the learning rate"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "targets.parquet").exists()


BAD = [
    ("model.name_or_path=/no/such/model", "cannot load model '/no/such/model'"),
    ("target.sites=[layer.0.ffn_out]", "does not parse"),
    ("target.sites=[layer.0.attn.1]", "unknown point 'attn'"),
    ("target.sites=[layer.5.ffn_out.0]", "layer 5 out of range; valid 0..1"),
    ("target.sites=[layer.1.ffn_act.64]", "unit 64 out of range for ffn_act; valid 0..63"),
    ("target.per_layer=0", "target.per_layer=0; valid: null or an integer >= 1"),
    ("target.per_layer=null target.fraction=0", "target.fraction=0"),
    ("target.layers=[]", "target.layers=[] is an empty list; valid: null (every layer)"),
    ("target.layers=[7]", "layer 7 out of range"),
    ("target.point=mlp", "target.point='mlp'; valid: attn_ctx, attn_out, ffn_act, ffn_out, resid"),
    ("experiment=group_k10 target.k=65", "target.k=65; valid 1..64"),
    ("experiment=group_k10 target.k=0", "target.k=0"),
    ("experiment=group_k10 target.k=-3", "target.k=-3"),
    ("experiment=group_k10 target.words=[zebra]", "'zebra' is not in the vocabulary"),
    ("experiment=group_k10 target.words=[sofas]", "tokenizes to ['sofa', '##s']"),
    ("experiment=group_k10 target.words=[] target.num_random=0 target.num_frequent=0",
     "target.words=[] is an empty list; valid: null"),
    ("experiment=group_k10 target.num_random=0 target.num_frequent=0", "no target words"),
    ("experiment=group_k10 target.selection=best", "target.selection='best'"),
    ("input.length=0", "input.length=0"),
    ("trainer.max_steps=0", "trainer.max_steps=0; valid: an integer > 0"),
    ("trainer.max_steps=-5", "trainer.max_steps=-5"),
    ("optim.lr=nan", "optim.lr=nan; valid: a finite number > 0"),
    ("optim.lr=inf", "optim.lr=inf"),
    ("optim.lr=-1", "optim.lr=-1"),
    ("position=3", "position=3; valid 1..input.length=1"),
    ("target.shard=3 target.num_shards=3", "target.shard=3"),
    ("engine.restarts=0", "engine.restarts=0"),
    ("engine.fast_forward=sometimes", "engine.fast_forward='sometimes'; valid: auto, true, false"),
    ("ckpt_path=/no/such.ckpt", "ckpt_path='/no/such.ckpt'"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_error_and_writes_nothing(override, message, tiny_dir, tmp_path):
    args = override.split()
    exp = args.pop(0).split("=")[1] if args[0].startswith("experiment=") else "default"
    cfg = compose_cfg(tiny_overrides(tiny_dir, exp, 3) + ["logger.wandb.mode=disabled", *args])
    with pytest.raises(FtError) as err:
        run(cfg, tmp_path / "run")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_checkpoint_from_another_model_is_refused(tiny_dir, tmp_path):
    from tests.conftest import build_tiny

    other = build_tiny(tmp_path / "other", hidden=16)
    cfg = compose_cfg(tiny_overrides(tiny_dir, "default", 30) + ["logger.wandb.mode=disabled",
                                                                  "engine.checkpoint_every_n_steps=10"])
    run(cfg, tmp_path / "run")
    cfg2 = compose_cfg(tiny_overrides(other, "default", 30) + ["logger.wandb.mode=disabled"])
    with pytest.raises(FtError, match="made with model.name_or_path=.*valid: .*a new run directory"):
        run(cfg2, tmp_path / "run")


@pytest.mark.parametrize("args,message", [
    (["experiment=nope"], "experiment='nope' is not an option; valid: atlas, default, group_k10"),
    (["input=logits"], "input='logits' is not an option; valid: embedding, gumbel, onehot, projected, softmax, tokens"),
])
@pytest.mark.slow
def test_cli_unknown_config_option(args, message):
    proc = subprocess.run([sys.executable, "-m", "ft.train", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]


def test_no_secret_is_written(tiny_dir, tmp_path, monkeypatch):
    secret = "ftsecret" + "0123456789abcdef" * 2
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run(compose_cfg(tiny_overrides(tiny_dir, "default", 5)), tmp_path / "run")
    for path in Path(tmp_path / "run").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_no_pickle_in_ft():
    root = Path(__file__).parents[1] / "ft"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "trust_remote_code=True" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, (path, line)


def test_a_live_owner_keeps_its_lock_and_is_left_alone(tmp_path):
    """A lock held by a live process on this host is refused, and asking never signals it."""
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(f"{owner.pid}@{os.uname().nodename}")
        with pytest.raises(FtError, match=f"in use by process {owner.pid}@"):
            with RunLock(tmp_path):
                pass
        time.sleep(0.2)
        assert owner.poll() is None and (tmp_path / ".lock").read_text().startswith(str(owner.pid))
    finally:
        owner.kill()
        owner.wait()
