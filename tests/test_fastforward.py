"""The lean forward (ft.model.fastforward) reproduces Hugging Face's layers, row by row."""

from functools import partial

import pytest
import torch
from transformers import BertConfig, BertModel

from ft.core.errors import ConfigError
from ft.engine.module import TextualizationModule
from ft.inputs import build_input
from ft.model.fastforward import FastSiteReader, supports
from ft.model.sites import POINTS, SiteReader
from ft.model.vocab import Vocabulary
from tests.test_module import fit


@pytest.fixture(scope="module")
def three_layers():
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16)
    model = BertModel(cfg).eval()
    with torch.no_grad():  # HF initializes biases to zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("length", [1, 3, 8])  # 8: a sequence long enough for SDPA
def test_mixed_row_tops_match_the_hooks(three_layers, length):
    """Every row, stopped at its own layer in one shared pass, equals a hook read of that row alone."""
    torch.manual_seed(0)
    n = 9
    x = torch.randn(n, length + 2, 32)
    x[:, 0], x[:, -1] = torch.randn(32), torch.randn(32)  # [CLS] and [SEP]: the same in every row
    top = torch.tensor([2, 0, 1, 1, 2, 0, 0, 2, 1])
    fast = FastSiteReader(three_layers, POINTS, 2, 1).read(x, top, const_ends=True)
    for i in range(n):
        ref = SiteReader(three_layers, POINTS, int(top[i]), 1).read(inputs_embeds=x[i : i + 1])
        for p in POINTS:
            torch.testing.assert_close(fast[p][i, : int(top[i]) + 1], ref[p][0], rtol=1e-5, atol=1e-5)
            assert fast[p][i, int(top[i]) + 1 :].abs().sum() == 0  # never computed, never read


def test_layers_above_every_rows_top_are_zeros(three_layers):
    x = torch.randn(3, 3, 32)
    fast = FastSiteReader(three_layers, POINTS, 2, 1).read(x, torch.tensor([0, 1, 0]))
    ref = SiteReader(three_layers, POINTS, 1, 1).read(inputs_embeds=x)
    for p in POINTS:
        assert fast[p].shape[1] == 3 and fast[p][:, 2].abs().sum() == 0
        torch.testing.assert_close(fast[p][1, :2], ref[p][1], rtol=1e-5, atol=1e-5)


def test_gradients_match_the_hooks(three_layers):
    x = torch.randn(4, 3, 32)
    top = torch.tensor([0, 2, 1, 2])
    grads = []
    for fast in (True, False):
        xi = x.clone().requires_grad_(True)
        if fast:
            out = FastSiteReader(three_layers, ["ffn_out"], 2, 1).read(xi, top)["ffn_out"]
            val = out[torch.arange(4), top, 5].sum()
        else:
            val = sum(SiteReader(three_layers, ["ffn_out"], int(t), 1).read(inputs_embeds=xi[i : i + 1])
                      ["ffn_out"][0, int(t), 5] for i, t in enumerate(top))
        val.backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("length", [1, 8])
def test_site_objectives_and_gradients_match_the_hooks(three_layers, length):
    """`objective` with the lean forward (sites gathered per layer; the FFN output of a row's top
    layer only at the units it reads, or whole when it reads many units or the residual) equals
    the hook-based forward, in value and in gradient."""
    from ft.engine.module import objective
    from ft.model.sites import Site, SiteIndex

    lists = [[Site(2, "ffn_out", 5)], [Site(0, "ffn_act", 9)], [Site(1, "ffn_out", 3), Site(0, "resid", 4)],
             [Site(1, "resid", 2)], [Site(0, "ffn_out", u) for u in range(12)],  # many units: whole layer
             [Site(2, "ffn_out", 5), Site(2, "ffn_out", 6)], [Site(1, "ffn_act", 1), Site(2, "ffn_act", 60)],
             [Site(0, "ffn_out", 31)]]
    index = SiteIndex(three_layers, lists)
    torch.manual_seed(2)
    x = torch.randn(len(lists), length + 2, 32)
    x[:, 0], x[:, -1] = torch.randn(32), torch.randn(32)
    values, grads = [], []
    for fast in (True, False):
        xi = x.clone().requires_grad_(True)
        val = objective(three_layers, index, xi, 1, fast)
        (val * torch.arange(1.0, len(lists) + 1)).sum().backward()
        values.append(val.detach())
        grads.append(xi.grad[:, 1:-1])  # [CLS]/[SEP] are constants to the lean forward
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_engine_trajectory_is_the_same_with_either_forward(tiny, tmp_path):
    from tests.test_module import SITES

    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    finals = []
    for fast in (True, False):
        opt = partial(torch.optim.SGD, lr=10.0)
        inputs = build_input("onehot", range(len(SITES)), tiny.word_embeddings, seed=0, optimizer=opt)
        m = TextualizationModule(tiny.model, SITES, inputs, opt, vocab.cls_id, vocab.sep_id,
                                 stop_when_converged=False, fast_forward=fast)
        assert m.fast is fast and len(m.plan) == (1 if fast else 2)  # one shared pass vs per-layer chunks
        start = m.forward().detach()
        fit(m, 15, tmp_path)
        finals.append(m.forward().detach())
        assert (finals[-1] > start).all()  # both really optimized: equal finals are not two starts
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-4, atol=1e-5)


def test_unsupported_models_fall_back_or_refuse(tiny):
    class Odd(torch.nn.Module):
        config = tiny.model.config

    assert supports(tiny.model) and not supports(Odd())
    with pytest.raises(ConfigError, match="fast_forward"):
        from ft.engine.module import use_fast_forward

        use_fast_forward(Odd(), True)


def test_bench_flop_formula_matches_counted_flops(tiny, monkeypatch):
    """ft.bench's analytic FLOPs == what torch's FLOP counter sees in one step (fwd + bwd)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import ft.model.lean_plan
    from ft.bench import engine_flops
    from ft.model.lean_plan import site_plan
    from tests.test_module import SITES

    # attention through SDPA's math kernel, whose matmuls the counter sees (the same arithmetic
    # as the broadcast attention that short inputs use)
    monkeypatch.setattr(ft.model.lean_plan, "SHORT_SEQUENCE", 0)

    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    for fast in (True, False):
        opt = partial(torch.optim.SGD, lr=1.0)
        inputs = build_input("onehot", range(len(SITES)), tiny.word_embeddings, seed=0, optimizer=opt)
        m = TextualizationModule(tiny.model, SITES, inputs, opt, vocab.cls_id, vocab.sep_id, fast_forward=fast)
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            for rows, objective in m.plan:
                obj, _ = m.chunk_terms(rows, objective)
                obj.sum().backward()
        counted = counter.get_total_flops()
        if fast:  # the FFN output of a row's top layer at its read units only (mul and sum)
            S, inter = 3, tiny.model.config.intermediate_size
            counted += 2 * 2 * inter * sum(len(u[0]) for _, o in m.plan
                                           for u in site_plan(o.index, S, 1, torch.device("cpu"))[1].end_units if u)
        assert counted == pytest.approx(engine_flops(m, tiny.model.config), rel=1e-6)


def test_bf16_autocast_stays_close_to_fp32(three_layers):
    """Under bf16 autocast the lean forward runs (mixed dtypes meet in the site gather) and the
    objective stays within bf16 rounding of the fp32 one."""
    from ft.engine.module import objective
    from ft.model.sites import Site, SiteIndex

    lists = [[Site(2, "ffn_out", 5)], [Site(0, "ffn_act", 9)], [Site(1, "resid", 2), Site(2, "ffn_out", 1)]]
    index = SiteIndex(three_layers, lists)
    torch.manual_seed(3)
    x = torch.randn(len(lists), 3, 32)
    ref = objective(three_layers, index, x, 1, True)
    xi = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = objective(three_layers, index, xi, 1, True)
    low.float().sum().backward()
    assert torch.isfinite(xi.grad).all() and xi.grad[:, 1].abs().sum() > 0
    torch.testing.assert_close(low.float(), ref, rtol=5e-2, atol=5e-2)
