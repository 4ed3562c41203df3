import pytest
import torch

from ft.core.errors import SiteError
from ft.model.sites import POINTS, Site, SiteIndex, SiteReader


@pytest.mark.parametrize("text", ["layer.0.ffn_out.0", "layer.11.ffn_act.3071", "layer.5.resid.17"])
def test_site_round_trip(text):
    assert str(Site.parse(text)) == text


@pytest.mark.parametrize(
    "text", ["layer.x.ffn_out.1", "layer.1.mlp.3", "1.ffn_out.3", "layer.1.ffn_out", "", "layer.-1.resid.0"]
)
def test_bad_site_raises(text):
    with pytest.raises(SiteError, match="site"):
        Site.parse(text)


def test_out_of_range_site(tiny):
    with pytest.raises(SiteError, match=r"layer 7 out of range; valid 0\.\.1"):
        Site.parse("layer.7.ffn_out.0").check(tiny.model)
    with pytest.raises(SiteError, match=r"unit 32 out of range for ffn_out; valid 0\.\.31"):
        Site.parse("layer.0.ffn_out.32").check(tiny.model)
    assert Site.parse("layer.1.ffn_act.63").check(tiny.model).unit == 63


def test_resid_matches_hidden_states(tiny):
    ids = torch.tensor([[2, 10, 3], [2, 20, 3]])
    out = tiny.model(input_ids=ids, output_hidden_states=True)
    for position in (0, 1, 2):
        acts = SiteReader(tiny.model, ["resid"], 1, position).read(input_ids=ids)["resid"]
        for layer in range(2):
            torch.testing.assert_close(acts[:, layer], out.hidden_states[layer + 1][:, position])


def test_ffn_points_match_manual_computation(tiny):
    """ffn_act = GELU(intermediate.dense(h_attn)); ffn_out = output.dense(ffn_act)."""
    ids = torch.tensor([[2, 11, 3]])
    store = {}
    block = tiny.model.encoder.layer[1]

    def keep(_m, _i, out):
        store["attn"] = out[0]

    h = block.attention.register_forward_hook(keep)
    try:
        acts = SiteReader(tiny.model, POINTS, 1, 1).read(input_ids=ids)
    finally:
        h.remove()
    act = block.intermediate.intermediate_act_fn(block.intermediate.dense(store["attn"]))
    torch.testing.assert_close(acts["ffn_act"][:, 1], act[:, 1])
    torch.testing.assert_close(acts["ffn_out"][:, 1], block.output.dense(act)[:, 1])


def test_forward_stops_at_highest_needed_layer(tiny):
    calls = []
    h = tiny.model.encoder.layer[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        SiteReader(tiny.model, ["ffn_out"], 0, 1).read(input_ids=torch.tensor([[2, 9, 3]]))
    finally:
        h.remove()
    assert calls == []


def test_site_index_gathers_mean_of_sites(tiny):
    lists = [[Site(0, "ffn_out", 3)], [Site(1, "ffn_out", 5), Site(0, "ffn_act", 7)]]
    index = SiteIndex(tiny.model, lists)
    acts = SiteReader(tiny.model, index.points, index.max_layer, 1).read(
        input_ids=torch.tensor([[2, 9, 3], [2, 9, 3]])
    )
    flat = index.flatten(acts)
    got = (flat.gather(1, index.index) * index.weight).sum(1)
    want1 = (acts["ffn_out"][1, 1, 5] + acts["ffn_act"][1, 0, 7]) / 2
    torch.testing.assert_close(got[0], acts["ffn_out"][0, 0, 3])
    torch.testing.assert_close(got[1], want1)
