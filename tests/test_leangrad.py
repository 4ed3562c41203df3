"""The hand-written backward of the lean site reads (ft.model.leangrad) equals autograd's, and the hooks'."""

from functools import partial

import pytest
import torch
from transformers import BertConfig, BertModel

import ft.model.lean_plan
from ft.engine.module import TextualizationModule
from ft.inputs import build_input
from ft.model.ablate import ablated
from ft.model.encoder import load_encoder
from ft.model.fastforward import FastSiteReader
from ft.model.lean_plan import site_plan
from ft.model.sites import POINTS, Site, SiteIndex, SiteReader
from ft.model.vocab import Vocabulary
from tests.families import build_family

# the site lists: rows ending at every layer, every point, several sites a row, a top layer
# whose FFN output is computed at the read units only and one computed whole (a residual read,
# many units)
CASES = {
    "mixed": [[Site(2, "ffn_out", 5)], [Site(0, "ffn_act", 9)], [Site(1, "resid", 2), Site(2, "ffn_out", 1)],
              [Site(1, "attn_ctx", 3), Site(0, "attn_out", 4)], [Site(2, "ffn_act", 7)],
              [Site(0, "ffn_out", 3), Site(0, "ffn_out", 8)]],
    "residuals": [[Site(2, "resid", 5)], [Site(1, "ffn_out", 9)], [Site(0, "resid", 2)]],
    "every point": [[Site(j, p, u) for j in range(3) for p in POINTS for u in (1, 2)]],
    "many units": [[Site(1, "ffn_out", u) for u in range(20)], [Site(2, "ffn_out", 3)]],
}


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16)
    model = BertModel(cfg).eval().double()
    with torch.no_grad():  # HF initializes biases to zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def framed(n: int, length: int, dim: int = 32, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length + 2, dim, generator=g, dtype=dtype)
    x[:, 0], x[:, -1] = torch.randn(dim, generator=g, dtype=dtype), torch.randn(dim, generator=g, dtype=dtype)
    return x


def values_and_grad(model, index, x, hand: bool, monkeypatch) -> tuple[torch.Tensor, torch.Tensor, object]:
    monkeypatch.setattr(ft.model.fastforward, "HAND_BACKWARD", hand)
    xi = x.clone().requires_grad_(True)
    v = FastSiteReader(model, index.points, index.max_layer, 1).read_sites(xi, index, const_ends=True)
    g = torch.randn(v.shape, generator=torch.Generator().manual_seed(7), dtype=v.dtype)
    (v * g).sum().backward()
    return v.detach(), xi.grad, v.grad_fn


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("length", [1, 3, 6])
def test_values_and_gradients_equal_autograds(model64, case, length, monkeypatch):
    index = SiteIndex(model64, CASES[case])
    x = framed(len(CASES[case]), length)
    v1, g1, fn1 = values_and_grad(model64, index, x, True, monkeypatch)
    v0, g0, fn0 = values_and_grad(model64, index, x, False, monkeypatch)
    assert type(fn1).__name__ == "LeanSitesBackward" and type(fn0).__name__ != "LeanSitesBackward"
    torch.testing.assert_close(v1, v0, rtol=1e-12, atol=1e-12)
    assert g0.abs().max() > 0
    torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["mixed", "many units"])
def test_gradcheck(model64, case):
    """Finite differences in float64, on the optimized positions (the ends are constants)."""
    index = SiteIndex(model64, CASES[case])
    x = framed(len(CASES[case]), 2)
    ends = x[:, :1], x[:, -1:]
    reader = FastSiteReader(model64, index.points, index.max_layer, 1)

    def f(mid: torch.Tensor) -> torch.Tensor:
        out = reader.read_sites(torch.cat([ends[0], mid, ends[1]], 1), index, const_ends=True)
        assert type(out.grad_fn).__name__ == "LeanSitesBackward"
        return out

    assert torch.autograd.gradcheck(f, (x[:, 1:-1].clone().requires_grad_(True),))


@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
def test_each_lean_family_matches_the_hooks(family, tmp_path):
    """The values and input gradients equal a hook read of the HF modules (an independent path)."""
    enc = load_encoder(str(build_family(tmp_path / family, family)))
    model = enc.model
    E = enc.word_embeddings.shape[1]
    lists = [[Site(1, "ffn_out", 3)], [Site(0, "attn_ctx", 2), Site(1, "resid", 4)], [Site(0, "ffn_act", 5)]]
    index = SiteIndex(model, lists)
    x = framed(3, 2, E, torch.float32)
    xi = x.clone().requires_grad_(True)
    v = FastSiteReader(model, index.points, index.max_layer, 1).read_sites(xi, index, const_ends=True)
    assert type(v.grad_fn).__name__ == "LeanSitesBackward"
    xr = x.clone().requires_grad_(True)
    acts = SiteReader(model, index.points, index.max_layer, 1).read(inputs_embeds=xr)
    ref = torch.where(index.valid, index.flatten(acts).gather(1, index.index), 0)  # 0 in padding slots
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(v.shape, generator=torch.Generator().manual_seed(3))
    (v * w).sum().backward()
    (ref * w).sum().backward()
    mid = slice(1, -1)  # the optimized positions ([CLS]/[SEP] are constants: no gradient is kept there)
    assert (xi.grad[:, mid] - xr.grad[:, mid]).abs().max() <= 1e-5 * xr.grad[:, mid].abs().max()


def test_the_autograd_path_where_the_hand_backward_does_not_apply(model64, monkeypatch):
    """Ablation, autocast, long inputs and no_grad read through the autograd path, with equal values."""
    index = SiteIndex(model64, CASES["mixed"])
    reader = FastSiteReader(model64, index.points, index.max_layer, 1)
    x = framed(6, 1).requires_grad_(True)
    assert type(reader.read_sites(x, index, True).grad_fn).__name__ == "LeanSitesBackward"
    with ablated(model64, [Site(0, "ffn_act", 1)], "zero"):
        assert type(reader.read_sites(x, index, True).grad_fn).__name__ != "LeanSitesBackward"
    long = framed(6, ft.model.lean_plan.SHORT_SEQUENCE)  # S = SHORT_SEQUENCE + 2: the fused attention kernel
    assert type(reader.read_sites(long.requires_grad_(True), index, True).grad_fn).__name__ != "LeanSitesBackward"
    with torch.no_grad():
        assert reader.read_sites(x, index, True).grad_fn is None
    model32 = BertModel(model64.config).eval()
    index32 = SiteIndex(model32, CASES["mixed"])
    x32 = framed(6, 1, dtype=torch.float32).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FastSiteReader(model32, index32.points, index32.max_layer, 1).read_sites(x32, index32, True)
    assert type(out.grad_fn).__name__ != "LeanSitesBackward"


def test_flop_count_of_the_hand_backward_matches_counted_flops(tiny):
    """`step_flops` of the hand-written path == torch's FLOP counter on one step (fwd + bwd): the
    counter sees the matmuls; the broadcast attention and the top layer's read units are added
    from their formulas."""
    from torch.utils.flop_counter import FlopCounterMode

    from tests.test_module import SITES

    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    opt = partial(torch.optim.SGD, lr=1.0)
    inputs = build_input("onehot", range(len(SITES)), tiny.word_embeddings, seed=0, optimizer=opt)
    m = TextualizationModule(tiny.model, SITES, inputs, opt, vocab.cls_id, vocab.sep_id)
    def addmm_flop(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    # the hand backward accumulates with in-place addmm_, which the counter does not know by itself
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_flop}) as counter:
        for rows, objective in m.plan:
            obj, _ = m.chunk_terms(rows, objective)
            obj.sum().backward()
    counted = counter.get_total_flops()
    S, inter = 3, tiny.model.config.intermediate_size
    for _, o in m.plan:
        parts = FastSiteReader.flop_parts(tiny.model, o.index, 1, 1)
        counted += 3 * parts["attention"]
        units = site_plan(o.index, S, 1, torch.device("cpu"))[1].end_units
        counted += 2 * 2 * inter * sum(len(u[0]) for u in units if u)
    assert counted == pytest.approx(m.step_flops(1), rel=1e-6)
    hand = sum(FastSiteReader.step_flops(tiny.model, o.index, 1, 1, hand=True) for _, o in m.plan)
    autograd = sum(FastSiteReader.step_flops(tiny.model, o.index, 1, 1, hand=False) for _, o in m.plan)
    assert hand < autograd  # the top layer's query gradient at the read position only
