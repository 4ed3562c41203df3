"""ft.model.ablate: an ablated unit reads its fill in both readers, and the model downstream equals the
model with that unit's weights removed (an independent edit of the weights)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertModel

from ft.core.errors import ConfigError, SiteError
from ft.model.ablate import ablated, active
from ft.model.fastforward import FastSiteReader
from ft.model.sites import POINTS, Site, SiteIndex, SiteReader


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(4)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16)
    m = BertModel(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return m


def inputs(n: int = 5, length: int = 3) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(n, length + 2, 32)
    x[:, 0], x[:, -1] = torch.randn(32), torch.randn(32)
    return x


SITES = [Site(0, "ffn_out", 3), Site(0, "ffn_act", 10), Site(1, "attn_ctx", 5), Site(1, "resid", 7),
         Site(2, "attn_out", 1)]


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_both_readers_see_the_ablation_and_agree(model, mode):
    x = inputs()
    values = [0.5, -1.0, 2.0, 0.25, -0.75]
    plain = SiteReader(model, POINTS, 2, 1).read(inputs_embeds=x)
    with ablated(model, SITES, mode, values if mode == "mean" else None):
        hooked = SiteReader(model, POINTS, 2, 1).read(inputs_embeds=x)
        lean = FastSiteReader(model, POINTS, 2, 1).read(x, const_ends=True)
    assert active(model) is None  # the block leaves the model as it was
    for i, s in enumerate(SITES):
        fill = 0.0 if mode == "zero" else values[i]
        assert torch.allclose(hooked[s.point][:, s.layer, s.unit], torch.full((5,), fill))
    for p in POINTS:
        torch.testing.assert_close(lean[p], hooked[p], rtol=1e-5, atol=1e-5)
    # downstream of the first ablated unit everything moves; upstream nothing does
    assert torch.equal(hooked["attn_ctx"][:, 0], plain["attn_ctx"][:, 0])
    assert not torch.allclose(hooked["resid"][:, 2], plain["resid"][:, 2])
    again = SiteReader(model, POINTS, 2, 1).read(inputs_embeds=x)
    assert torch.equal(again["resid"], plain["resid"])  # hooks removed


def test_ablating_a_unit_equals_removing_its_weights(model):
    """Zeroing ffn_out unit u = zeroing row u of the FFN output projection (weight and bias);
    holding it at c = that row zero and its bias c; zeroing ffn_act unit j = column j of the
    output projection zero; zeroing attn_ctx unit j = column j of the attention output zero."""
    x = inputs()
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.encoder.layer[0].output.dense.weight[3] = 0
        edited.encoder.layer[0].output.dense.bias[3] = 0.5
        edited.encoder.layer[1].output.dense.weight[:, 10] = 0
        edited.encoder.layer[2].attention.output.dense.weight[:, 6] = 0
    sites = [Site(0, "ffn_out", 3), Site(1, "ffn_act", 10), Site(2, "attn_ctx", 6)]
    want = edited(inputs_embeds=x).last_hidden_state
    with ablated(model, sites[:1], "mean", [0.5]), ablated(model, sites[1:]):  # nested blocks add up
        got = model(inputs_embeds=x).last_hidden_state
        lean = FastSiteReader(model, ["resid"], 2, 1).read(x)["resid"][:, 2]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean, want[:, 1], rtol=1e-5, atol=1e-5)


def test_the_lean_sites_path_reads_ablated_units_at_a_rows_top_layer(model):
    """`read_sites` computes a row's top-layer FFN output only at the units it reads: an ablated
    one among them still reads its fill."""
    from ft.engine.module import objective

    # the last row reads an unablated unit above the ablated layer-0 one: rows going on carry it
    lists = [[Site(2, "ffn_out", 5)], [Site(0, "ffn_out", 3), Site(0, "ffn_out", 4)], [Site(1, "resid", 7)],
             [Site(2, "ffn_out", 6)]]
    index = SiteIndex(model, lists)
    x = inputs(4)
    with ablated(model, [Site(2, "ffn_out", 5), Site(0, "ffn_out", 3)], "mean", [1.5, -2.0]):
        fast = objective(model, index, x, 1, True)
        hooked = objective(model, index, x, 1, False)
    torch.testing.assert_close(fast, hooked, rtol=1e-5, atol=1e-5)
    assert float(fast.detach()[0]) == pytest.approx(1.5)
    plain = objective(model, index, x, 1, True)
    assert not torch.allclose(plain, fast)


def test_a_shared_layer_is_ablated_in_its_own_run_only(tmp_path):
    """ALBERT runs one layer module for every layer: ablating layer 1 leaves layer 0 alone."""
    from ft.model.encoder import load_encoder
    from tests.families import build_family

    enc = load_encoder(str(build_family(tmp_path / "albert", "albert")))
    ids = torch.tensor([[2, 10, 11, 3]])
    plain = SiteReader(enc.model, ["resid"], 1, 1).read(input_ids=ids)["resid"]
    with ablated(enc.model, ["layer.1.resid.4"]):
        cut = SiteReader(enc.model, ["resid"], 1, 1).read(input_ids=ids)["resid"]
    assert torch.equal(cut[:, 0], plain[:, 0]) and cut[0, 1, 4] == 0 and plain[0, 1, 4] != 0


def test_bad_ablations_are_refused(model):
    with pytest.raises(ConfigError, match="ablate.mode='half'.*valid"), ablated(model, [Site(0, "resid", 1)], "half"):
        pass
    with pytest.raises(ConfigError, match="one value per site"), ablated(model, [Site(0, "resid", 1)], "mean"):
        pass
    with pytest.raises(SiteError, match="out of range"), ablated(model, ["layer.9.resid.1"]):
        pass
    with pytest.raises(ConfigError, match="empty"), ablated(model, []):
        pass
    assert active(model) is None
