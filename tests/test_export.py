"""Exports others can load: the `hf` folder through Hugging Face `datasets`, the `neuronpedia` JSON
against Neuronpedia's record shape, both round-tripped against the run's own files."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from ft.export import main
from ft.results import read_inputs, read_summary, read_targets
from tests.test_train import compose_cfg

# Neuronpedia's records (hijohnnylin/neuronpedia, apps/webapp/prisma/schema.prisma): the required
# fields of `Neuron` and of `Activation`, with their types (the database assigns ids and creators)
NEURON = {"modelId": str, "layer": str, "index": str}
NEURON_OPTIONAL = {"maxActApprox": float, "frac_nonzero": float, "pos_str": list, "pos_values": list,
                   "neg_str": list, "neg_values": list}
ACTIVATION = {"tokens": list, "values": list, "maxValue": float, "maxValueTokenIndex": int, "minValue": float,
              "modelId": str, "layer": str, "index": str}


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    from ft.train import run

    root = tmp_path_factory.mktemp("export_runs")
    base = [f"model.name_or_path={tiny_dir}", "trainer.max_steps=6", "logger.wandb.mode=disabled",
            "+trainer.enable_progress_bar=false"]
    run(compose_cfg([*base, "target.sites=[layer.0.ffn_out.3,layer.1.ffn_act.9,layer.1.head.0]"]), root / "neurons")
    run(compose_cfg([*base, "target=terms", "target.specs=[layer.1.ffn_out.7 - layer.0.ffn_out.2]", "input=tokens",
                     "search.patience=2"]), root / "tokens")
    return root


def test_hf_export_loads_with_datasets_and_round_trips(runs, tmp_path):
    import datasets

    out = tmp_path / "hf"
    assert main([str(runs / "neurons"), str(runs / "tokens"), "--format", "hf", "-o", str(out)]) == 0
    ds = datasets.load_dataset("parquet", data_dir=str(out / "data"))["train"]
    assert len(ds) == 4 and ds.column_names[:3] == ["run", "model", "label"]
    same = datasets.load_dataset(str(out))["train"]  # the card's configs name the data files
    assert len(same) == 4
    for name in ("neurons", "tokens"):
        t, inputs = read_targets(runs / name), read_inputs(runs / name)
        rows = [r for r in ds if r["run"].endswith(f"-{name}")]
        assert [r["objective"] for r in rows] == pytest.approx(list(t.objective))
        assert [r["sites"] for r in rows] == [list(s) for s in t.sites]
        assert [r["closest_words"] for r in rows] == [list(w) for w in t.closest_words]
        torch.testing.assert_close(torch.tensor([r["embeds"] for r in rows]), inputs["embeds"].float())
    text_rows = [r for r in ds if r["run"].endswith("-tokens")]
    assert isinstance(text_rows[0]["text"], str) and text_rows[0]["input_kind"] == "tokens"
    header = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert header["ft_version"] and header["configs"][0]["data_files"][0]["path"].startswith("data/")
    assert {r["metrics"]["final/activation_mean"] for r in header["runs"]} == {
        read_summary(runs / n)["final/activation_mean"] for n in ("neurons", "tokens")}
    assert "```yaml" in (out / "README.md").read_text()  # each run's config, as it was made


def test_neuronpedia_export_has_the_record_shape_and_true_activations(runs, tiny, tmp_path):
    out = tmp_path / "np"
    assert main([str(runs / "neurons"), "--format", "neuronpedia", "-o", str(out), "--top-n", "3",
                 "--max-sentences", "200"]) == 0
    [folder] = list(out.iterdir())
    docs = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
    assert sorted(docs) == ["0", "1", "2"]
    t = read_targets(runs / "neurons").set_index("target_id")
    for tid, doc in docs.items():
        for key, kind in {**NEURON, **NEURON_OPTIONAL}.items():
            assert isinstance(doc[key], kind), (key, doc[key])
        assert len(doc["pos_str"]) == len(doc["pos_values"]) and len(doc["activations"]) == 3
        for a in doc["activations"]:
            for key, kind in ACTIVATION.items():
                assert isinstance(a[key], kind), key
            assert len(a["tokens"]) == len(a["values"]) and a["maxValue"] == max(a["values"])
            assert a["values"][a["maxValueTokenIndex"]] == a["maxValue"] and a["maxValue"] <= doc["maxActApprox"]
        assert doc["ft"]["objective"] == pytest.approx(t.loc[int(tid)].objective)
        assert 0 <= doc["frac_nonzero"] <= 1
    unit = docs["0"]
    assert (unit["layer"], unit["index"]) == ("0-ft-ffn_out", "3") and docs["2"]["layer"] == "ft-head"
    assert unit["explanations"][0]["description"] == ", ".join(list(t.loc[0].closest_words)[:10])
    # the per-token values are the unit's activation, recomputed by a hook on the HF module
    a = unit["activations"][0]
    ids = tiny.tokenizer.convert_tokens_to_ids(a["tokens"])
    seen = []
    h = tiny.model.encoder.layer[0].output.dense.register_forward_hook(lambda _m, _i, o: seen.append(o[0, 1:-1, 3]))
    with torch.no_grad():
        tiny.model(input_ids=torch.tensor([[tiny.tokenizer.cls_token_id, *ids, tiny.tokenizer.sep_token_id]]))
    h.remove()
    assert a["values"] == pytest.approx(seen[0].tolist(), abs=1e-5)
    # static readings: the largest E.v over the vocabulary (v: the unit's row of the output projection)
    from ft.vocab import Vocabulary

    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)  # the items that count as words (no special tokens)
    column = tiny.model.embeddings.word_embeddings.weight[vocab.ids, 3]  # E . e_3 for an ffn_out unit
    assert unit["pos_values"][0] == pytest.approx(float(column.max()), abs=1e-6)
    assert unit["neg_values"][0] == pytest.approx(float(column.min()), abs=1e-6)
    assert unit["pos_str"][0] == vocab.tokens[int(column.argmax())]


def test_exports_refuse_bad_input_and_leave_nothing(runs, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    assert main([str(runs / "neurons"), "--format", "hf", "-o", str(busy)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert main([str(tmp_path), "--format", "hf", "-o", str(tmp_path / "o")]) == 2
    assert "no run directories" in capsys.readouterr().err and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        main([str(runs / "neurons"), "--format", "csv", "-o", str(tmp_path / "o")])
