from functools import partial

import pytest
import pytorch_lightning as pl
import torch

from ft.core.errors import ConfigError
from ft.engine.module import TextualizationModule
from ft.inputs import EmbeddingInput, OneHotFastInput, OneHotInput, build_input, initial_onehot
from ft.model.sites import Site
from ft.model.vocab import Vocabulary

SITES = [[Site(0, "ffn_out", 3)], [Site(1, "ffn_out", 7)], [Site(1, "ffn_act", 1), Site(0, "ffn_out", 2)]]


def trained(tiny, tmp_path, fast, opt, steps=20):
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    inputs = build_input("onehot", range(3), tiny.word_embeddings, init_std=0.05, seed=1,
                         fast=fast, optimizer=opt)
    m = TextualizationModule(tiny.model, SITES, inputs, opt, vocab.cls_id, vocab.sep_id,
                             stop_when_converged=False)
    pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, default_root_dir=str(tmp_path)).fit(m)
    return m


@pytest.mark.parametrize("opt", [partial(torch.optim.SGD, lr=5.0),
                                 partial(torch.optim.SGD, lr=2.0, momentum=0.9, nesterov=True)])
def test_fast_path_follows_the_literal_trajectory(tiny, tmp_path, opt):
    literal = trained(tiny, tmp_path, False, opt)
    fast = trained(tiny, tmp_path, "auto", opt)
    assert isinstance(literal.inputs, OneHotInput) and isinstance(fast.inputs, OneHotFastInput)
    W = tiny.word_embeddings
    e_lit, e_fast = literal.embeds().detach(), fast.embeds().detach()
    assert (e_lit - literal.inputs.x.detach()[:, :, :5] @ W[:5]).abs().max() > 0  # it moved
    torch.testing.assert_close(e_fast, e_lit, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.inputs.onehot(W), literal.inputs.onehot(), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(fast(), literal(), rtol=1e-4, atol=1e-4)


def test_every_kind_starts_from_the_same_point(tiny):
    W = tiny.word_embeddings
    x0 = initial_onehot([0, 1, 2], 2, W.shape[0], 0.01, 0)
    for kind, fast in (("onehot", False), ("onehot", True), ("embedding", "auto")):
        p = build_input(kind, [0, 1, 2], W, length=2, fast=fast,
                        optimizer=partial(torch.optim.SGD, lr=1.0))
        torch.testing.assert_close(p.embeds(W).detach(), x0 @ W, rtol=1e-5, atol=1e-6)
    # per-target seeding: target 1 alone starts where it starts in the batch
    alone = build_input("embedding", [1], W, length=2)
    torch.testing.assert_close(alone.embeds(W).detach()[0], (x0 @ W)[1], rtol=1e-5, atol=1e-6)


def test_fast_path_choice_and_errors(tiny):
    W = tiny.word_embeddings
    adam = partial(torch.optim.Adam, lr=0.1)
    assert isinstance(build_input("onehot", [0], W, optimizer=adam), OneHotInput)
    assert isinstance(build_input("embedding", [0], W, optimizer=adam), EmbeddingInput)
    with pytest.raises(ConfigError, match="input.fast=true needs optim=SGD"):
        build_input("onehot", [0], W, fast=True, optimizer=adam)
    with pytest.raises(ConfigError, match="input.kind='logits'"):
        build_input("logits", [0], W)
    with pytest.raises(ConfigError, match="input.length=0"):
        build_input("embedding", [0], W, length=0)


def test_set_rows_keeps_one_parameter_and_the_fast_paths_preconditioning(tiny):
    """A rank's block of rows (and the gathered rows afterwards) replaces the trainable tensor;
    the one-hot fast path's gradient is still multiplied by WᵀW afterwards."""
    W = tiny.word_embeddings.detach()
    fast = build_input("onehot", range(4), W, fast=True, optimizer=partial(torch.optim.SGD, lr=1.0))
    fast.set_rows(fast.param.detach()[1::2] * 2)
    assert len(list(fast.parameters())) == 1 and fast.param.shape[0] == 2 and fast.param.requires_grad
    fast.embeds(W).sum().backward()
    torch.testing.assert_close(fast.param.grad, torch.ones(2, 1, W.shape[1]) @ (W.T @ W), rtol=1e-5, atol=1e-5)
    plain = build_input("embedding", range(4), W)
    value = torch.randn(3, 1, W.shape[1])
    plain.set_rows(value)
    assert torch.equal(plain.param.detach(), value) and plain.param.data_ptr() != value.data_ptr()


def test_gumbel_accepts_a_constant_temperature_and_refuses_bad_ones(tiny):
    from ft.inputs import GumbelInput

    x0 = torch.zeros(1, 1, 5)
    assert GumbelInput(x0, tau_start=0.5, tau_end=0.5).tau_at(3, 10) == pytest.approx(0.5)
    for start, end in ((0.1, 0.5), (1.0, 0.0), (1.0, -1.0)):
        with pytest.raises(ConfigError, match=f"input.tau_start={start}, tau_end={end}; valid: 0 < end <= start"):
            GumbelInput(x0, tau_start=start, tau_end=end)
