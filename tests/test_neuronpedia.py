"""`ft.export --format neuronpedia`, read back the way Neuronpedia's importer reads it
(hijohnnylin/neuronpedia: apps/webapp/app/api/admin/import/route.ts, lib/db/import.ts
`importJsonlString`) and checked against its Prisma schema (apps/webapp/prisma/schema.prisma) and
against the runs, target by target."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from ft.export import CREATOR_ID, main
from ft.rundir.results import read_config, read_inputs, read_summary, read_targets, target_label, write_run
from tests.test_train import compose_cfg

# Columns of the tables the export writes (schema.prisma): json type, and whether a row must carry
# it non-null. The gzipped tables go in by raw SQL (jsonb_to_recordset), where Prisma's defaults
# (`@default(cuid())` ids) do not apply; the plain ones go through `prisma.X.create({data: line})`,
# which refuses a key that is not a field.
S, N, F, B, LS, LF = str, int, float, bool, "list[str]", "list[float]"
SCHEMA: dict[str, dict[str, tuple[object, bool]]] = {
    "Model": {"id": (S, True), "displayNameShort": (S, False), "displayName": (S, False), "creatorId": (S, True),
              "tlensId": (S, False), "openRouterId": (S, False), "dimension": (N, False), "thinking": (B, False),
              "visibility": (S, False), "defaultSourceSetName": (S, False), "defaultSourceId": (S, False),
              "inferenceEnabled": (B, False), "instruct": (B, False), "layers": (N, True),
              "neuronsPerLayer": (N, True), "owner": (S, True), "website": (S, False)},
    "SourceRelease": {"name": (S, True), "visibility": (S, False), "isNewUi": (B, False), "featured": (B, False),
                      "description": (S, True), "descriptionShort": (S, False), "urls": (LS, True),
                      "creatorEmail": (S, False), "creatorName": (S, True), "creatorNameShort": (S, False),
                      "creatorId": (S, True), "defaultSourceSetName": (S, False), "defaultSourceId": (S, False)},
    "SourceSet": {"modelId": (S, True), "name": (S, True), "hasDashboards": (B, False),
                  "allowInferenceSearch": (B, False), "visibility": (S, False), "description": (S, True),
                  "type": (S, False), "creatorName": (S, True), "urls": (LS, False), "creatorEmail": (S, False),
                  "creatorId": (S, True), "releaseName": (S, False)},
    "Source": {"id": (S, True), "modelId": (S, True), "hasDashboards": (B, False), "inferenceEnabled": (B, False),
               "saelensRelease": (S, False), "saelensSaeId": (S, False), "hfRepoId": (S, False),
               "hfFolderId": (S, False), "visibility": (S, False), "setName": (S, True), "creatorId": (S, True),
               "num_prompts": (N, False), "num_tokens_in_prompt": (N, False), "dataset": (S, False),
               "notes": (S, False)},
    "Neuron": {"modelId": (S, True), "layer": (S, True), "index": (S, True), "sourceSetName": (S, False),
               "creatorId": (S, False), "maxActApprox": (F, False), "hasVector": (B, False), "vector": (LF, False),
               "neg_str": (LS, False), "neg_values": (LF, False), "pos_str": (LS, False), "pos_values": (LF, False),
               "frac_nonzero": (F, False)},
    "Activation": {"id": (S, True), "tokens": (LS, True), "dataIndex": (S, False), "index": (S, True),
                   "layer": (S, True), "modelId": (S, True), "dataSource": (S, False), "maxValue": (F, True),
                   "maxValueTokenIndex": (N, True), "minValue": (F, True), "values": (LF, True),
                   "creatorId": (S, True), "binMin": (F, False), "binMax": (F, False), "binContains": (F, False),
                   "qualifyingTokenIndex": (N, False)},
    "Explanation": {"id": (S, True), "modelId": (S, True), "layer": (S, True), "index": (S, True),
                    "description": (S, True), "authorId": (S, True), "triggeredByUserId": (S, False),
                    "notes": (S, False), "typeName": (S, False), "explanationModelName": (S, False)},
    "ExplanationType": {"name": (S, True), "displayName": (S, True), "description": (S, True),
                        "featured": (B, False), "isAttention": (B, False), "settings": (S, False), "url": (S, False),
                        "creatorName": (S, True), "creatorId": (S, True)},
    "ExplanationModelType": {"name": (S, True), "displayName": (S, True), "description": (S, True),
                             "featured": (B, False), "openRouterModelId": (S, False), "url": (S, False),
                             "creatorName": (S, True)},
}
PLAIN = {"release.jsonl": "SourceRelease", "model.jsonl": "Model", "sourceset.jsonl": "SourceSet",
         "source.jsonl": "Source"}
GZ = {"features": "Neuron", "activations": "Activation", "explanations": "Explanation"}
CONFIG = {"explanation_type.jsonl": "ExplanationType", "explanation_model_type.jsonl": "ExplanationModelType"}


def typed(value: object, kind: object) -> bool:
    if isinstance(kind, str):
        inner = {"list[str]": str, "list[float]": (int, float)}[kind]
        return isinstance(value, list) and all(isinstance(v, inner) and not isinstance(v, bool) for v in value)
    if kind is F:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is N:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_rows(table: str, rows: list[dict], columns: list[str]) -> None:
    """Every column a schema field of `table`, of its type; every required one non-null in every row."""
    schema = SCHEMA[table]
    assert set(columns) <= set(schema), (table, set(columns) - set(schema))
    for name, (kind, required) in schema.items():
        if required:
            assert name in columns, (table, name)
        for row in rows:
            value = row.get(name)
            assert value is not None or not required, (table, name, row)
            assert value is None or typed(value, kind), (table, name, value)


def importer_lines(text: str) -> list[dict]:
    """importJsonlString: non-empty lines; the FIRST line's keys are the columns, so a key another
    line has and the first lacks would be dropped (refused here), a key it lacks is null."""
    lines = [json.loads(x) for x in text.strip().split("\n") if x.strip()]
    assert lines, "an empty table file (the importer fails on JSON.parse(''))"
    columns = list(lines[0])
    for line in lines:
        assert set(line) <= set(columns), set(line) - set(columns)
    return [{c: line.get(c) for c in columns} for line in lines]


def read_export(out: Path) -> dict:
    """The export as the importer sees it: config rows, and per `<modelId>/<sourceId>` folder the
    rows of each table."""
    got = {"config": {}, "sources": {}}
    for name, table in CONFIG.items():
        rows = importer_lines((out / "config" / name).read_text())
        check_rows(table, rows, list(rows[0]))
        got["config"][table] = rows
    for folder in sorted(p for p in out.glob("*/*") if p.is_dir() and p.parent.name != "config"):
        tables = {}
        for name, table in PLAIN.items():  # downloadFileJsonlParsedLines: plain JSON lines
            rows = [json.loads(x) for x in (folder / name).read_text().splitlines() if x.strip()]
            for row in rows:
                check_rows(table, [row], list(row))
            tables[table] = rows
        for sub, table in GZ.items():  # getFilesInPath(path/sub, '.jsonl.gz') + downloadAndDecompressFile
            rows = []
            for f in sorted((folder / sub).glob("*.jsonl.gz")):
                part = importer_lines(gzip.decompress(f.read_bytes()).decode())
                check_rows(table, part, list(part[0]))
                rows += part
            tables[table] = rows
        tables["ft"] = [json.loads(x) for x in (folder / "ft.jsonl").read_text().splitlines()]
        got["sources"][(folder.parent.name, folder.name)] = tables
    return got


def check_references(got: dict) -> None:
    """Every foreign key resolves to a row of the export (users: the seeded bot user)."""
    types = {r["name"] for r in got["config"]["ExplanationType"]}
    model_types = {r["name"] for r in got["config"]["ExplanationModelType"]}
    neurons, ids = set(), {"Activation": set(), "Explanation": set()}
    for (model_id, source_id), t in got["sources"].items():
        [model], [source], [sset], [release] = t["Model"], t["Source"], t["SourceSet"], t["SourceRelease"]
        assert model["id"] == model_id and source["id"] == source_id and source["modelId"] == model_id
        assert model["id"] == model["id"].lower() and len(model["id"]) <= 128
        layer, _, rest = source_id.partition("-")  # lib/utils/source.ts: <layer>-<set>[__<more>]
        assert layer.isdigit() and rest.split("__")[0] == source["setName"] == sset["name"]
        assert sset["modelId"] == model_id and sset["releaseName"] == release["name"]
        users = {model["creatorId"], source["creatorId"], sset["creatorId"], release["creatorId"]}
        for n in t["Neuron"]:
            assert (n["modelId"], n["layer"], n["sourceSetName"]) == (model_id, source_id, sset["name"])
            assert (model_id, source_id, n["index"]) not in neurons  # unique (modelId, layer, index)
            neurons.add((model_id, source_id, n["index"]))
            users.add(n["creatorId"])
        here = {n["index"] for n in t["Neuron"]}
        for table in ("Activation", "Explanation"):
            for row in t[table]:
                assert (row["modelId"], row["layer"]) == (model_id, source_id) and row["index"] in here
                assert row["id"] not in ids[table]
                ids[table].add(row["id"])
                users.add(row["creatorId" if table == "Activation" else "authorId"])
        for e in t["Explanation"]:
            assert e["typeName"] in types and e["explanationModelName"] in model_types
        assert users == {CREATOR_ID}
    assert {r["creatorId"] for r in got["config"]["ExplanationType"]} == {CREATOR_ID}


def find(got: dict, run: str, target_id: int) -> tuple[dict, dict, dict | None, list[dict], dict]:
    """(ft record, Neuron, Explanation or None, Activations, the source's tables) of one target."""
    for (_, _), t in got["sources"].items():
        for rec in t["ft"]:
            if rec["run"] == run and rec["target_id"] == target_id:
                [neuron] = [n for n in t["Neuron"] if n["index"] == rec["index"]]
                acts = [a for a in t["Activation"] if a["index"] == rec["index"]]
                expl = [e for e in t["Explanation"] if e["id"] == rec["explanationId"]]
                return rec, neuron, (expl[0] if expl else None), acts, t
    raise AssertionError(f"target {target_id} of {run} is not in the export")


def by_hand(tiny, row, ids: list[int], sae=None) -> list[float]:
    """A unit's activation at each token of `[CLS] ids [SEP]`, read from the HF modules by hooks (no
    ft code): ffn_out = the FFN's output projection, ffn_act = the intermediate (after GELU),
    an SAE latent = (h - b_dec) . W_enc[:, latent] + b_enc[latent] on the layer's output."""
    x = torch.tensor([[tiny.tokenizer.cls_token_id, *ids, tiny.tokenizer.sep_token_id]])
    site = str(row.sites[0]).split(".")
    layer = tiny.model.encoder.layer[int(site[1])]
    seen = []
    if row.kind == "sae":
        with torch.no_grad():
            h = tiny.model(input_ids=x, output_hidden_states=True).hidden_states[int(site[1]) + 1][0, 1:-1]
        latent = int(row.latent)
        return ((h - sae.b_dec) @ sae.W_enc[:, latent] + sae.b_enc[latent]).tolist()
    module = {"ffn_out": layer.output.dense, "ffn_act": layer.intermediate}[site[2]]
    hook = module.register_forward_hook(lambda _m, _i, o: seen.append(o[0, 1:-1, int(site[3])]))
    with torch.no_grad():
        tiny.model(input_ids=x)
    hook.remove()
    return seen[0].tolist()


def alone(tiny, run_dir: Path, t: int, ids: list[int]) -> list[float]:
    """Target t's activation scored with a scorer that holds that target alone."""
    from ft.measure.examples import TargetScorer
    from ft.rundir.results import read_directions
    from ft.targets import readouts_of_table

    table = read_targets(run_dir).sort_values("target_id").iloc[[t]]
    scorer = TargetScorer(tiny, readouts_of_table(tiny.model, table, read_directions(run_dir)))
    return scorer.batch([ids])[0, :, 0].tolist()


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    from ft.targets.sae_file import SAE
    from ft.train import run

    root = tmp_path_factory.mktemp("np_runs")
    base = [f"model.name_or_path={tiny_dir}", "trainer.max_steps=6", "logger.wandb.mode=disabled",
            "+trainer.enable_progress_bar=false"]
    run(compose_cfg([*base, "target.sites=[layer.0.ffn_out.3,layer.1.ffn_act.9,layer.1.head.0]"]), root / "neurons")
    run(compose_cfg([*base, "target=terms", "target.specs=[layer.1.ffn_out.7 - layer.0.ffn_out.2,layer.1.ffn_out.5]",
                     "input=tokens", "search.patience=2"]), root / "tokens")
    g = torch.Generator().manual_seed(3)
    SAE(torch.randn(32, 8, generator=g), torch.randn(8, generator=g), torch.randn(8, 32, generator=g),
        torch.randn(32, generator=g) * 0.1).save(root / "sae")
    run(compose_cfg([*base, "target=sae", f"target.path={root / 'sae'}", "target.site=layer.1.resid",
                     "target.latents=[2,5,6]"]), root / "sae_run")
    return root


def export(paths: list[Path], out: Path, *extra: str) -> int:
    return main([*map(str, paths), "--format", "neuronpedia", "-o", str(out), "--top-n", "3",
                 "--max-sentences", "120", *extra])


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("np") / "export"
    assert export([runs / "neurons", runs / "tokens", runs / "sae_run"], out) == 0
    return out


def test_the_export_is_the_importers_layout_with_every_key_and_reference(exported):
    got = read_export(exported)
    check_references(got)
    sources = {s for _, s in got["sources"]}
    assert {"0-ft-ffn_out", "1-ft-ffn_act", "1-ft-head", "1-ft-sae-resid-8"} <= sources
    assert any(s.startswith("1-ft-terms__") for s in sources)  # a run's own units: in a source of its run
    assert len({m for m, _ in got["sources"]}) == 1
    # the plain tables are single JSON lines, the row tables gzipped (the importer ungzips them)
    for folder in (p for p in exported.glob("*/*") if p.parent.name != "config"):
        assert all(f.read_bytes()[:2] == b"\x1f\x8b" for f in folder.glob("*/*.jsonl.gz"))
        assert sorted(f.name for f in folder.iterdir()) == ["activations", "explanations", "features", "ft.jsonl",
                                                            "model.jsonl", "release.jsonl", "source.jsonl",
                                                            "sourceset.jsonl"]


def test_every_target_has_its_own_unit_values_and_explanation(exported, runs, tiny):
    from ft.targets.sae_file import load_sae

    got = read_export(exported)
    sae = load_sae(runs / "sae")
    want_unit = {("neurons", 0): ("0-ft-ffn_out", "3"), ("neurons", 1): ("1-ft-ffn_act", "9"),
                 ("neurons", 2): ("1-ft-head", "0"), ("sae_run", 0): ("1-ft-sae-resid-8", "2"),
                 ("sae_run", 1): ("1-ft-sae-resid-8", "5"), ("sae_run", 2): ("1-ft-sae-resid-8", "6")}
    descriptions = set()
    for name in ("neurons", "tokens", "sae_run"):
        label = next(r["run"] for t in got["sources"].values() for r in t["ft"] if r["run"].endswith(f"-{name}"))
        for row in read_targets(runs / name).sort_values("target_id").itertuples():
            t = int(row.target_id)
            rec, neuron, expl, acts, _ = find(got, label, t)
            if (name, t) in want_unit:
                assert (rec["layer"], rec["index"]) == want_unit[name, t]
            else:  # terms: index = target id, in its run's source
                assert (rec["layer"].split("__")[0], rec["index"]) == ("1-ft-terms", str(t))
            assert rec["objective"] == pytest.approx(float(row.objective)) and rec["label"] == target_label(row)
            assert len(acts) == 3 and neuron["maxActApprox"] == pytest.approx(max(a["maxValue"] for a in acts))
            for a in acts:
                ids = tiny.tokenizer.convert_tokens_to_ids(a["tokens"])
                hand = by_hand(tiny, row, ids, sae) if row.kind == "sae" or row.kind == "neuron" and \
                    str(row.sites[0]).split(".")[2] in ("ffn_out", "ffn_act") else alone(tiny, runs / name, t, ids)
                assert a["values"] == pytest.approx(hand, abs=1e-4), (name, t)
                assert a["maxValue"] == max(a["values"]) == a["values"][a["maxValueTokenIndex"]]
                assert a["minValue"] == min(a["values"]) and a["maxValue"] <= neuron["maxActApprox"] + 1e-6
            want = row.text if isinstance(getattr(row, "text", None), str) else ", ".join(list(row.closest_words)[:10])
            assert expl["description"] == want and f"target {t} " in expl["notes"] and label in expl["notes"]
            descriptions.add(want)
    assert len(descriptions) > 3  # the targets' own texts, not one copied to all


def test_static_readings_of_an_ffn_out_unit_are_its_embedding_column(exported, runs, tiny):
    from ft.model.vocab import Vocabulary

    got = read_export(exported)
    [neuron] = [n for (_, s), t in got["sources"].items() if s == "0-ft-ffn_out" for n in t["Neuron"]]
    vocab = Vocabulary.from_tokenizer(tiny.tokenizer)
    column = tiny.model.embeddings.word_embeddings.weight[vocab.ids, 3]  # E . e_3 for an ffn_out unit
    assert neuron["pos_values"][0] == pytest.approx(float(column.max()), abs=1e-6)
    assert neuron["neg_values"][0] == pytest.approx(float(column.min()), abs=1e-6)
    assert neuron["pos_str"][0] == vocab.tokens[int(column.argmax())] and 0 <= neuron["frac_nonzero"] <= 1


def test_two_runs_with_one_name_both_arrive(runs, tmp_path, capsys):
    for side in ("a", "b"):
        shutil.copytree(runs / "neurons", tmp_path / side / "neurons")
    assert export([tmp_path / "a", tmp_path / "b"], tmp_path / "out") == 0
    assert "2 runs" in capsys.readouterr().out
    got = read_export(tmp_path / "out")
    check_references(got)
    records = [r for t in got["sources"].values() for r in t["ft"]]
    assert len(records) == 6 and len({r["run"] for r in records}) == 2
    # one unit, one Neuron and its activations; one explanation per run
    for t in got["sources"].values():
        assert len(t["Neuron"]) == 1 and len(t["Activation"]) == 3 and len(t["Explanation"]) == 2


def test_a_diverged_target_is_exported_without_an_explanation(runs, tmp_path, caplog):
    src, dst = runs / "neurons", tmp_path / "diverged"
    targets = read_targets(src)
    targets.loc[targets.target_id == 1, ["objective", "diverged"]] = [-float("inf"), True]
    targets.loc[targets.target_id == 2, "objective"] = float("nan")
    write_run(dst, read_config(src), targets, read_inputs(src), read_summary(src))
    assert export([dst], tmp_path / "out") == 0
    err = caplog.text
    assert "target 1 (layer.1.ffn_act.9) diverged" in err and "target 2 (layer.1.head.0) diverged" in err
    got = read_export(tmp_path / "out")
    check_references(got)
    label = next(r["run"] for t in got["sources"].values() for r in t["ft"])
    for t, has in ((0, True), (1, False), (2, False)):
        rec, neuron, expl, acts, _ = find(got, label, t)
        assert (expl is not None) == has and len(acts) == 3 and neuron["maxActApprox"] is not None
        assert rec["diverged"] == (not has) and (rec["objective"] is None) == (not has)
    # the hf export keeps the values as they are
    assert main([str(dst), "--format", "hf", "-o", str(tmp_path / "hf")]) == 0
    rows = pd.read_parquet(tmp_path / "hf" / "data" / "train-00000-of-00001.parquet")
    assert rows.objective[1] == -float("inf") and rows.objective.isna().tolist() == [False, False, True]


def test_the_same_export_twice_is_the_same_bytes(runs, tmp_path):
    paths = [runs / "neurons", runs / "sae_run"]
    assert export(paths, tmp_path / "one") == 0 and export(paths, tmp_path / "two") == 0
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in files)


def test_an_sae_changed_after_the_run_does_not_change_the_export(runs, tiny_dir, tmp_path):
    pytest.importorskip("ft.rundir.kept")  # runs keep their SAE (another part of issue 35)
    from ft.targets.sae_file import SAE, load_sae
    from ft.train import run

    sae = load_sae(runs / "sae")
    SAE(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec).save(tmp_path / "sae")
    run(compose_cfg([f"model.name_or_path={tiny_dir}", "trainer.max_steps=2", "logger.wandb.mode=disabled",
                     "+trainer.enable_progress_bar=false", "target=sae", f"target.path={tmp_path / 'sae'}",
                     "target.site=layer.1.resid", "target.latents=[2]"]), tmp_path / "run")
    assert export([tmp_path / "run"], tmp_path / "before") == 0
    SAE(sae.W_enc * 3, sae.b_enc, sae.W_dec, sae.b_dec).save(tmp_path / "sae")  # the original, changed
    assert export([tmp_path / "run"], tmp_path / "after") == 0
    for f in (tmp_path / "before").rglob("*.gz"):
        assert f.read_bytes() == (tmp_path / "after" / f.relative_to(tmp_path / "before")).read_bytes()


def test_a_model_changed_after_the_run_is_refused(tmp_path, capsys):
    pytest.importorskip("ft.rundir.kept")
    from ft.train import run
    from tests.conftest import build_tiny

    model = build_tiny(tmp_path / "model")
    run(compose_cfg([f"model.name_or_path={model}", "trainer.max_steps=2", "logger.wandb.mode=disabled",
                     "+trainer.enable_progress_bar=false", "target.sites=[layer.0.ffn_out.3]"]), tmp_path / "run")
    build_tiny(model, seed=5)  # other weights at the same path
    assert export([tmp_path / "run"], tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "altered" in err and not (tmp_path / "out").exists()


def test_two_saes_of_one_name_get_sources_of_their_own(runs, tiny_dir, tmp_path):
    from ft.targets.sae_file import load_sae
    from ft.train import run

    sae = load_sae(runs / "sae")
    sae.rescaled(2.0).save(tmp_path / "sae")  # another SAE: the same site and width
    run(compose_cfg([f"model.name_or_path={tiny_dir}", "trainer.max_steps=2", "logger.wandb.mode=disabled",
                     "+trainer.enable_progress_bar=false", "target=sae", f"target.path={tmp_path / 'sae'}",
                     "target.site=layer.1.resid", "target.latents=[2]"]), tmp_path / "other")
    assert export([runs / "sae_run", tmp_path / "other"], tmp_path / "out") == 0
    got = read_export(tmp_path / "out")
    check_references(got)
    sources = sorted(s for _, s in got["sources"])
    assert len(sources) == 2 and all(s.startswith("1-ft-sae-resid-8__") for s in sources)
    counts = sorted(len(t["Neuron"]) for t in got["sources"].values())
    assert counts == [1, 3]  # latent 2 of each SAE, apart


def test_a_runs_kept_sae_is_read_checked_or_refused(runs, tmp_path, capsys, caplog):
    kept_dir = pytest.importorskip("ft.rundir.kept").KEPT
    old, altered = tmp_path / "old", tmp_path / "altered"
    shutil.copytree(runs / "sae_run", old)
    shutil.copytree(runs / "sae_run", altered)
    shutil.rmtree(old / kept_dir)  # a run from before runs kept their inputs: the recorded path, said
    assert export([old], tmp_path / "out_old") == 0
    assert "kept no copy of its SAE" in caplog.text
    [weights] = (altered / kept_dir).rglob("sae_weights.safetensors")
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # the run's own copy, altered
    assert export([altered], tmp_path / "out_altered") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "altered" in err and not (tmp_path / "out_altered").exists()
