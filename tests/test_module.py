from functools import partial

import pytest
import torch

from ft.engine.module import TextualizationModule, full_sequence, objective
from ft.inputs import build_input
from ft.model.sites import Site
from ft.model.vocab import Vocabulary

SITES = [[Site(0, "ffn_out", 3)], [Site(1, "ffn_out", 7)], [Site(1, "ffn_out", 1), Site(0, "ffn_out", 2)]]


def make(tiny, kind="embedding", opt=None, **kw):
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    inputs = build_input(kind, range(len(SITES)), tiny.word_embeddings, seed=0)
    opt = opt or partial(torch.optim.Adam, lr=0.1)
    return TextualizationModule(tiny.model, SITES, inputs, opt, vocab.cls_id, vocab.sep_id, **kw)


def fit(module, steps, tmp_path):
    import pytorch_lightning as pl

    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    trainer.fit(module)
    return trainer


def test_exactly_one_trainable_tensor(tiny):
    for kind in ("onehot", "embedding"):
        m = make(tiny, kind)
        trainable = [n for n, p in m.named_parameters() if p.requires_grad]
        assert len(trainable) == 1 and trainable[0].startswith("inputs.")
        assert len(list(m.configure_optimizers().param_groups[0]["params"])) == 1


@pytest.mark.parametrize("kind,opt", [
    ("embedding", partial(torch.optim.Adam, lr=0.1)),
    ("onehot", partial(torch.optim.SGD, lr=10.0)),
])
def test_activation_rises_and_encoder_stays_frozen(tiny, tmp_path, kind, opt):
    m = make(tiny, kind, opt, stop_when_converged=False)
    before = m().detach()
    weights = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    fit(m, 30, tmp_path)
    after = m().detach()
    assert (after > before).all(), (before, after)
    assert m.state.step == 30
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_chunks_give_the_same_trajectory(tiny, tmp_path):
    a, b = make(tiny, chunk_size=1), make(tiny, chunk_size=256)
    fit(a, 10, tmp_path)
    fit(b, 10, tmp_path)
    torch.testing.assert_close(a.embeds(), b.embeds(), rtol=1e-5, atol=1e-6)


def test_objective_is_the_mean_activation_of_independent_forward(tiny):
    m = make(tiny)
    e = m.embeds().detach()
    seq = full_sequence(e, tiny.word_embeddings, m.cls_id, m.sep_id)
    out = tiny.model(inputs_embeds=seq, output_hidden_states=True)
    assert seq[0, 0].equal(tiny.word_embeddings[m.cls_id])
    got = objective(tiny.model, m.index, seq, 1)
    # independent: recompute ffn_out of layer 0 from hidden state 0 and layer 0's attention
    blk = tiny.model.encoder.layer[0]
    attn = blk.attention(out.hidden_states[0])[0]
    ffn0 = blk.output.dense(blk.intermediate(attn))[:, 1]
    torch.testing.assert_close(got[0], ffn0[0, 3])
    blk1 = tiny.model.encoder.layer[1]
    attn1 = blk1.attention(out.hidden_states[1])[0]
    ffn1 = blk1.output.dense(blk1.intermediate(attn1))[:, 1]
    torch.testing.assert_close(got[2], (ffn1[2, 1] + ffn0[2, 2]) / 2)


def test_checkpoint_holds_input_and_optimizer_not_encoder(tiny, tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    m = make(tiny)
    ck = ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True, save_top_k=0,
                         every_n_train_steps=5)
    trainer = pl.Trainer(max_steps=5, logger=False, callbacks=[ck], enable_progress_bar=False,
                         default_root_dir=str(tmp_path))
    trainer.fit(m)
    state = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    keys = set(state["state_dict"])
    assert "inputs.e" in keys and not any(k.startswith("encoder.") for k in keys)
    assert state["optimizer_states"][0]["state"]  # Adam moments are there
    torch.testing.assert_close(state["state_dict"]["inputs.e"], m.inputs.e.detach())


def test_convergence_stops_the_run(tiny, tmp_path):
    m = make(tiny, opt=partial(torch.optim.SGD, lr=0.0), converge_window=3, converge_tol=1e-6)
    fit(m, 50, tmp_path)
    assert m.state.step == 4  # nothing moves: converged after window + 1 steps
    assert m.converged().all()


def test_frozen_rows_drop_out_of_the_plan(tiny, tmp_path):
    """Once most rows are frozen, the step runs only the others; frozen inputs never move."""
    m = make(tiny, stop_when_converged=False)
    m.state.frozen[[0, 2]] = True
    plan = m.active_plan()
    assert sorted(int(r) for rows, _ in plan for r in rows) == [1]
    before = m.inputs.param.detach().clone()
    fit(m, 3, tmp_path)
    after = m.inputs.param.detach()
    assert torch.equal(after[[0, 2]], before[[0, 2]]) and not torch.equal(after[1], before[1])
    assert torch.isfinite(m.state.last[1]) and m.state.last[1] > m.state.history[0, 1]


def planted(tiny, values: list[list[float]], window: int, tol: float, **kw) -> tuple:
    """A module whose objective history is `values` (one list per step, a value per target), each
    observed by the module's ConvergenceControl as after a training step, under a real (idle) Trainer."""
    import pytorch_lightning as pl

    sites = [[Site(0, "ffn_out", i)] for i in range(len(values[0]))]
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    inputs = build_input("embedding", range(len(sites)), tiny.word_embeddings)
    m = TextualizationModule(tiny.model, sites, inputs, partial(torch.optim.Adam, lr=0.1), vocab.cls_id,
                             vocab.sep_id, converge_window=window, converge_tol=tol, **kw)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    m.trainer = trainer
    stops = []
    for v in values:
        record(m, v)
        stops.append(bool(trainer.should_stop))
    return m, stops


def record(m, values) -> None:
    """What a training step leaves for the control: the step's objective, the step counted."""
    m.state.last = torch.tensor(values)
    m.state.step += 1
    m.control.observe(m.trainer, m.state)


def test_convergence_is_relative_to_the_value_and_over_exactly_the_window(tiny):
    # target 0: 1000 -> 1000.5 (relative 5e-4 <= 1e-3: converged although it moved 0.5);
    # target 1: 1e-3 -> 2e-3 (moved 1e-3 <= tol in absolute terms, but doubled: not converged);
    # target 2: moves 1.0 once, at the second step, then stays: converged only once that change
    #           is more than `window` steps old.
    steps = [[1000.0, 1e-3, 5.0], [1000.2, 1.2e-3, 6.0], [1000.4, 1.6e-3, 6.0], [1000.5, 2e-3, 6.0],
             [1000.5, 2e-3, 6.0]]
    m, stops = planted(tiny, steps[:4], window=3, tol=1e-3, stop_when_converged=False)
    # after 4 records: now = step 3, before = step 0
    assert m.converged().tolist() == [True, False, False]
    record(m, steps[4])  # now = step 4, before = step 1
    assert m.converged().tolist() == [True, False, True]
    short, _ = planted(tiny, steps[:3], window=3, tol=1e-3, stop_when_converged=False)
    assert not short.converged().any()  # fewer than window + 1 values: nothing has converged yet


def test_the_run_stops_when_all_targets_converged_not_any(tiny):
    flat, moving = [2.0] * 8, [float(i) for i in range(8)]
    _, stops = planted(tiny, [[a, b] for a, b in zip(flat, moving, strict=True)], window=2, tol=1e-4)
    assert not any(stops)  # one target still moves
    _, stops = planted(tiny, [[a, a] for a in flat], window=2, tol=1e-4)
    assert stops == [False, False, True, True, True, True, True, True]  # once window + 1 values are in


def test_freezing_marks_only_converged_targets_at_their_step(tiny):
    flat, moving = [2.0] * 6, [float(i) for i in range(6)]
    m, stops = planted(tiny, [[a, b] for a, b in zip(flat, moving, strict=True)], window=2, tol=1e-4,
                       freeze_converged=True, stop_when_converged=False)
    assert m.state.frozen.tolist() == [True, False] and not any(stops)
    assert m.state.stopped_at.tolist() == [3, -1] and m.state.steps_per_row().tolist() == [3, 6]


def test_resumed_module_takes_the_optimizer_state_from_the_checkpoint(tiny, tmp_path):
    """Fit 5 steps with a checkpoint, resume a fresh module to 10: equal to 10 uninterrupted
    steps (Adam's moments restored, not restarted), and the moments equal the saved ones."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    def trainer(steps, ck=None):
        cbs = [ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True, save_top_k=0,
                               every_n_train_steps=5)] if ck else []
        return pl.Trainer(max_steps=steps, logger=False, callbacks=cbs, enable_checkpointing=bool(ck),
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))

    first = make(tiny, stop_when_converged=False)
    trainer(5, ck=True).fit(first)
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["optimizer_states"][0]["state"][0]
    resumed = make(tiny, stop_when_converged=False)
    t = trainer(10)
    t.fit(resumed, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    straight = make(tiny, stop_when_converged=False)
    fit(straight, 10, tmp_path)
    assert resumed.state.step == 10
    torch.testing.assert_close(resumed.embeds(), straight.embeds(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(resumed.state.history, straight.state.history, equal_nan=True)
    assert float(t.optimizers[0].state_dict()["state"][0]["step"]) == 10 and float(saved["step"]) == 5


def test_gather_rows_puts_every_row_back_in_target_order(tiny, tmp_path):
    """Under a (one-process) process group, a module holding rank 0's interleaved rows gathers
    them back: the same inputs and per-row state, all rows owned again, the plan rebuilt."""
    import socket

    import torch.distributed as dist

    m = make(tiny, stop_when_converged=False)
    fit(m, 3, tmp_path)
    before = (m.inputs.param.detach().clone(), m.state.history.clone(), m.state.stopped_at.clone())
    m.rows = slice(0, len(SITES), 1)  # rank 0 of 1: the same rows, as a rank's slice
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        m.gather_rows()
    finally:
        dist.destroy_process_group()
    assert m.rows == slice(0, len(SITES)) and m.num_targets == len(SITES)
    assert torch.equal(m.inputs.param.detach(), before[0]) and m.inputs.param.requires_grad
    assert torch.equal(m.state.history.nan_to_num(-7.0), before[1].nan_to_num(-7.0))
    assert torch.equal(m.state.stopped_at, before[2])
    assert m.state.curves.shape == (len(m.state.curve_steps), len(SITES))
    assert sum(c.stop - c.start for c, _ in m.plan) == len(SITES)


def test_objective_of_readouts_reads_the_rows_given(tiny):
    """`objective` with a batch of readouts (not only a site index): the mean of each row's sites,
    as the hooked reader gives them."""
    from ft.engine.module import full_sequence, objective
    from ft.model.sites import Site, SiteReader
    from ft.targets.objectives import Readouts, mean

    sites = [[Site(0, "ffn_out", 1), Site(1, "ffn_out", 2)], [Site(1, "ffn_act", 3)]]
    batch = Readouts(tiny.model, [mean(s) for s in sites])
    W = tiny.word_embeddings.detach()
    seq = full_sequence(W[torch.tensor([[5], [6]])], W, tiny.tokenizer.cls_token_id, tiny.tokenizer.sep_token_id)
    got = objective(tiny.model, batch, seq, 1, False)
    acts = SiteReader(tiny.model, ["ffn_out", "ffn_act"], 1, 1).read(inputs_embeds=seq)
    want = [sum(float(acts[s.point][i, s.layer, s.unit]) for s in row) / len(row) for i, row in enumerate(sites)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)
