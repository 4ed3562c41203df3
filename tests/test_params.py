"""Parameterizations, readouts, temperature control, regularizers, restarts, shards."""

from functools import partial

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch

from ft.callbacks import TemperatureSchedule
from ft.engine.module import TextualizationModule
from ft.inputs import GumbelInput, build_input
from ft.measure.metrics import VocabFacts, evaluate
from ft.measure.word_stats import vocab_objective
from ft.model.sites import Site
from ft.model.vocab import Vocabulary, analysis_vectors, load_or_sweep
from ft.rundir.results import read_inputs, read_targets
from ft.train import run
from tests.test_train import compose_cfg, tiny_overrides

SITES = [[Site(0, "ffn_out", 3)], [Site(1, "ffn_out", 7)], [Site(1, "ffn_out", 1), Site(0, "ffn_out", 2)]]


def module(tiny, kind, opt, **kw):
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    inputs = build_input(kind, range(3), tiny.word_embeddings, optimizer=opt, **kw.pop("inp", {}))
    return TextualizationModule(tiny.model, SITES, inputs, opt, vocab.cls_id, vocab.sep_id,
                                stop_when_converged=False, **kw)


def fit(m, steps, tmp_path, callbacks=()):
    pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               callbacks=list(callbacks), default_root_dir=str(tmp_path)).fit(m)
    return m


@pytest.mark.parametrize("kind,opt", [
    ("onehot", partial(torch.optim.SGD, lr=10.0)), ("onehot", partial(torch.optim.Adam, lr=0.05)),
    ("embedding", partial(torch.optim.Adam, lr=0.1)), ("softmax", partial(torch.optim.Adam, lr=0.5)),
    ("gumbel", partial(torch.optim.Adam, lr=0.5)),
])
def test_each_parameterization_raises_its_objective(tiny, tmp_path, kind, opt):
    torch.manual_seed(0)
    m = module(tiny, kind, opt)
    m.eval()
    before = m().detach()
    fit(m, 25, tmp_path, [TemperatureSchedule()])
    m.eval()
    after = m().detach()
    assert after.mean() > before.mean() and (after > before).sum() >= 2, (before, after)


def test_gumbel_temperature_follows_its_schedule(tiny, tmp_path):
    opt = partial(torch.optim.Adam, lr=0.1)
    m = module(tiny, "gumbel", opt, inp=dict(tau_start=2.0, tau_end=0.1))
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *a):
            seen.append(float(pl_module.inputs.tau))

    fit(m, 11, tmp_path, [TemperatureSchedule(), Spy()])
    expected = [2.0 * (0.1 / 2.0) ** (s / 10) for s in range(11)]
    assert seen == pytest.approx(expected, rel=1e-5)
    assert seen[-1] == pytest.approx(0.1)
    assert isinstance(m.inputs, GumbelInput)


def test_gumbel_warns_when_schedule_not_reached(tiny, tmp_path):
    m = module(tiny, "gumbel", partial(torch.optim.Adam, lr=0.1), inp=dict(anneal_steps=50))
    with pytest.warns(UserWarning, match="tau"):
        fit(m, 5, tmp_path, [TemperatureSchedule()])


@pytest.mark.parametrize("kind", ["embedding", "softmax"])
def test_snapped_activation_equals_fresh_forward(tiny, tmp_path, kind):
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    sweep = load_or_sweep(tiny, vocab, "ffn_out")
    word_obj = vocab_objective({"ffn_out": sweep}, tiny.model, SITES)
    from ft.targets import Target

    targets = [Target("neuron", s) for s in SITES]
    facts = VocabFacts.build(vocab, analysis_vectors(tiny, vocab), {"ffn_out": sweep}, tiny.model, targets)
    m = fit(module(tiny, kind, partial(torch.optim.Adam, lr=0.1)), 10, tmp_path)
    df, _ = evaluate(m.result(vocab.ids), targets, facts, tiny, 1)
    for t, row in df.iterrows():
        r = vocab.tokens.index(row.snapped_tokens[0])
        # independent: the vocabulary sweep's activation for that single word
        assert row.snapped_activation == pytest.approx(float(word_obj[r, t]), rel=1e-4, abs=1e-5)
        assert row.snap_gap == pytest.approx(row.objective - row.snapped_activation, abs=1e-6)
        if kind == "softmax":
            assert row.snapped_tokens[0] == vocab.tokens[int(m.inputs.x[t, 0, vocab.ids].argmax())]
            assert 0 < row.entropy <= float(torch.log(torch.tensor(float(tiny.vocab_size))))
        else:
            assert row.snapped_tokens[0] == row.closest_words[0] and row.entropy is None


def test_regularizer_weight_zero_equals_none_and_word_pull_works(tiny, tmp_path):
    opt = partial(torch.optim.Adam, lr=0.1)
    vecs = analysis_vectors(tiny, Vocabulary.from_tokenizer(tiny.tokenizer))
    plain = fit(module(tiny, "embedding", opt), 15, tmp_path)
    zero = fit(module(tiny, "embedding", opt, reg_norm=0.0, reg_word=0.0, word_vectors=vecs), 15, tmp_path)
    assert torch.equal(plain.embeds(), zero.embeds())
    pulled = fit(module(tiny, "embedding", opt, reg_word=50.0, word_vectors=vecs), 15, tmp_path)
    small = fit(module(tiny, "embedding", opt, reg_norm=1.0), 15, tmp_path)

    def max_cos(m):
        a = m.encoder.embeddings(inputs_embeds=torch.cat([
            m.word_embeddings[[m.cls_id]].expand(3, 1, -1), m.embeds().detach(),
            m.word_embeddings[[m.sep_id]].expand(3, 1, -1)], 1))[:, 1]
        return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(vecs, dim=-1).T

    assert max_cos(pulled).max(-1).values.mean() > max_cos(plain).max(-1).values.mean()
    assert small.embeds().norm(dim=-1).mean() < plain.embeds().norm(dim=-1).mean()


def test_frozen_targets_stop_moving(tiny, tmp_path):
    m = module(tiny, "embedding", partial(torch.optim.Adam, lr=0.1), freeze_converged=True,
               converge_window=2, converge_tol=10.0)  # everything "converges" after 3 steps
    fit(m, 8, tmp_path)
    assert m.state.frozen.all() and (m.state.steps_per_row() == 3).all()


def small_run(tiny_dir, tmp_path, name, *extra):
    cfg = compose_cfg(tiny_overrides(tiny_dir, "default", steps=12) + ["logger.wandb.mode=disabled", *extra])
    run(cfg, tmp_path / name)
    return read_targets(tmp_path / name), read_inputs(tmp_path / name)


def test_restarts_keep_the_best_and_record_all(tiny_dir, tmp_path):
    one, _ = small_run(tiny_dir, tmp_path, "one")
    three, _ = small_run(tiny_dir, tmp_path, "three", "engine.restarts=3")
    assert list(three.target_id) == list(one.target_id)
    assert all(len(r) == 3 for r in three.restart_objectives)
    assert (three.objective == three.restart_objectives.map(max)).all()
    # restart 0 is the single run
    first = three.restart_objectives.map(lambda r: r[0]).tolist()
    assert first == pytest.approx(one.objective.tolist(), rel=1e-5)


def test_three_shards_merge_into_the_unsharded_run(tiny_dir, tmp_path):
    full, full_t = small_run(tiny_dir, tmp_path, "full")
    parts = [small_run(tiny_dir, tmp_path, f"s{i}", f"target.shard={i}", "target.num_shards=3")
             for i in range(3)]
    merged = pd.concat([p[0] for p in parts]).sort_values("target_id").reset_index(drop=True)
    assert list(merged.target_id) == list(full.target_id) == list(range(len(full)))
    assert list(merged.sites) == list(full.sites)
    rel = ((merged.objective - full.objective).abs() / full.objective.abs().clip(lower=1e-6)).max()
    assert rel <= 1e-4
    embeds = torch.cat([p[1]["embeds"] for p in parts])
    torch.testing.assert_close(embeds, full_t["embeds"], rtol=1e-4, atol=1e-5)


def test_scheduler_and_sgd_configs(tiny_dir, tmp_path):
    df, _ = small_run(tiny_dir, tmp_path, "sched", "scheduler=cosine", "optim=sgd", "input=onehot")
    assert len(df) == 4 and df.steps.eq(12).all()


def test_active_target_count_is_logged(tiny_dir, tmp_path):
    """Freezing converged targets shows in the logged curve of active targets."""
    import pandas as pd

    small_run(tiny_dir, tmp_path, "frz", "engine.freeze_converged=true", "engine.converge_window=2",
              "engine.converge_tol=10.0", "engine.stop_when_converged=false", "trainer.log_every_n_steps=1")
    hist = pd.read_csv(next((tmp_path / "frz" / "csv").rglob("metrics.csv"))).dropna(subset=["engine/active_targets"])
    active = hist["engine/active_targets"].tolist()
    assert active[0] == 4 and active[-1] == 0  # default on the tiny model: 2 per layer x 2 layers


def test_gumbel_is_read_noise_free_at_its_final_temperature(tiny, tmp_path):
    """After the schedule, evaluation reads softmax(x / tau_end) · W: the saved embeds, the
    entropy and the snapped argmax are all that distribution's, with no Gumbel noise."""
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    sweep = load_or_sweep(tiny, vocab, "ffn_out")
    from ft.targets import Target

    targets = [Target("neuron", s) for s in SITES]
    facts = VocabFacts.build(vocab, analysis_vectors(tiny, vocab), {"ffn_out": sweep}, tiny.model, targets)
    m = fit(module(tiny, "gumbel", partial(torch.optim.Adam, lr=0.5), inp=dict(tau_start=2.0, tau_end=0.25)),
            6, tmp_path, [TemperatureSchedule()])
    assert float(m.inputs.tau) == pytest.approx(0.25)
    df, tensors = evaluate(m.result(vocab.ids), targets, facts, tiny, 1)
    x = m.inputs.x.detach().float()
    p = torch.softmax(x / 0.25, dim=-1)  # independent: the final temperature, no noise
    torch.testing.assert_close(tensors["embeds"], p @ tiny.word_embeddings.detach(), rtol=1e-5, atol=1e-6)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1)
    assert df.entropy.tolist() == pytest.approx(entropy.tolist(), rel=1e-5)
    assert torch.softmax(x, dim=-1).ne(p).any()  # tau matters here: tau = 1 would read otherwise
    # deterministic: no noise drawn at evaluation
    df2, tensors2 = evaluate(m.result(vocab.ids), targets, facts, tiny, 1)
    assert torch.equal(tensors["embeds"], tensors2["embeds"])


def test_word_regularizer_is_measured_in_the_analysis_space(tiny):
    """reg.word's penalty = w · sum over tokens of (1 - max cosine to a word), both sides taken
    through the embedding layer (LayerNorm(e + position + segment)), recomputed by hand."""
    from tests.reference import analysis_by_hand

    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    vecs = analysis_vectors(tiny, vocab)
    m = module(tiny, "embedding", partial(torch.optim.Adam, lr=0.1), reg_word=3.0, word_vectors=vecs)
    obj, total = m.chunk_terms(slice(None), m.objective_batch)
    penalty = (obj - total).sum()  # the regularizer enters with a minus sign
    a = analysis_by_hand(tiny.model, m.embeds().detach(), 1)[:, 0]  # [T, H]
    W = tiny.word_embeddings.detach()[vocab.ids]
    words = analysis_by_hand(tiny.model, W[:, None], 1)[:, 0]
    cos = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(words, dim=-1).T
    assert float(penalty.detach()) == pytest.approx(3.0 * float((1 - cos.max(-1).values).sum()), rel=1e-5)
    raw = torch.nn.functional.normalize(m.embeds().detach()[:, 0], dim=-1) @ torch.nn.functional.normalize(W, dim=-1).T
    assert float((1 - raw.max(-1).values).sum()) != pytest.approx(float((1 - cos.max(-1).values).sum()), rel=1e-3)
    norm = module(tiny, "embedding", partial(torch.optim.Adam, lr=0.1), reg_norm=0.5)
    obj, total = norm.chunk_terms(slice(None), norm.objective_batch)
    pen = (obj - total).sum()
    assert float(pen) == pytest.approx(0.5 * float(norm.embeds().detach().pow(2).sum()), rel=1e-5)


def module_as_run_builds_it(cfg):
    """The module `run` would fit for `cfg` (its own preparation and construction, no fit)."""
    from ft.cli.build import build_module, prepare_targets
    from ft.model.encoder import load_encoder

    enc = load_encoder(cfg.model.name_or_path)
    targets, facts = prepare_targets(cfg, enc)
    return enc, targets, facts, build_module(cfg, enc, targets, facts)


def test_a_run_pulls_toward_words_with_the_analysis_vectors(tiny_dir, tmp_path):
    """What `run` hands the module for reg.word is the analysis-space word vectors of the run's
    position."""
    cfg = compose_cfg(tiny_overrides(tiny_dir, "default", steps=4) + ["reg=word", "reg.word=2.0"])
    enc, targets, facts, m = module_as_run_builds_it(cfg)
    vecs = analysis_vectors(enc, Vocabulary.from_tokenizer(enc.tokenizer), cfg.position)
    from ft.targets.objectives import WordDistance

    (weight, term), = m.regularizers.terms()  # reg.norm=0 adds nothing
    assert weight == -2.0 and isinstance(term, WordDistance)
    torch.testing.assert_close(term.word_unit, torch.nn.functional.normalize(vecs, dim=-1))
    # a config written before engine.fast_forward existed still builds, on the lean forward
    from omegaconf import open_dict

    from ft.cli.build import build_module

    with open_dict(cfg):
        del cfg.engine["fast_forward"]
    assert build_module(cfg, enc, targets, facts).fast is True


@pytest.mark.parametrize("scheduler", ["cosine", "exponential"])
def test_the_configured_scheduler_sets_the_learning_rate(tiny_dir, tmp_path, scheduler):
    """The last learning rate of a run equals the schedule's own value after max_steps steps."""
    from hydra.utils import instantiate

    cfg = compose_cfg(tiny_overrides(tiny_dir, "default", steps=6) + [f"scheduler={scheduler}",
                                                                       "engine.stop_when_converged=false"])
    m = module_as_run_builds_it(cfg)[3]
    fit(m, 6, tmp_path)
    # independent: the same schedule on a throwaway optimizer, stepped 6 times
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=float(cfg.optim.lr))
    sched = instantiate(cfg.scheduler)(probe)
    for _ in range(6):
        probe.step()
        sched.step()
    lr = m.trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(probe.param_groups[0]["lr"], rel=1e-9) and lr < float(cfg.optim.lr)
