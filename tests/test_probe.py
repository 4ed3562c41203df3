"""ft.probe: a planted concept neuron is found by both rankings; the control task stays at chance."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from ft.cli.probe_run import probe
from ft.core.errors import ConfigError
from ft.data.concepts import BUILTIN, load_concept
from ft.model.encoder import from_model
from tests.test_train import CONFIG_DIR

ANIMALS = "cat dog horse cow sheep goat mouse bird fish".split()
OTHERS = "table chair window door floor wall roof river bank money house garden music piano violin guitar apple".split()
PLANTED = 7  # the residual dimension the concept words carry


def planted_encoder(tiny):
    """The tiny BERT with the animals' embeddings pushed along dimension PLANTED: after layer 0
    the residual stream's unit 7 fires on them."""
    from transformers import BertModel

    model = BertModel(tiny.model.config)
    model.load_state_dict(tiny.model.state_dict())
    ids = tiny.tokenizer.convert_tokens_to_ids(ANIMALS)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[ids, PLANTED] += 6.0
    return from_model(model.eval(), tiny.tokenizer, "planted")


def probe_cfg(concept, *extra):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("probe", overrides=[f"concept={concept}", "point=resid", "layers=[0]", *extra])


def concept_file(tmp_path, labels):
    path = tmp_path / "animals.csv"
    path.write_text("word,label\n" + "".join(f"{w},{lab}\n" for w, lab in labels))
    return str(path)


def test_the_planted_neuron_ranks_first_and_the_control_stays_at_chance(tiny, tmp_path):
    enc = planted_encoder(tiny)
    labels = [(w, "animal") for w in ANIMALS] + [(w, "other") for w in OTHERS[:9]]
    summary = probe(probe_cfg(concept_file(tmp_path, labels)), tmp_path / "run", enc)
    import pandas as pd

    table = pd.read_parquet(tmp_path / "run" / "probe.parquet")
    first = table.set_index("site").loc[f"layer.0.resid.{PLANTED}"]
    assert first.rank_probe == 1 and first.rank_probeless == 1
    assert summary["probe/accuracy"] >= 0.9
    assert summary["probe/control_accuracy"] <= 0.7 and summary["probe/selectivity"] >= 0.3
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["probe/selectivity"] == summary[
        "probe/selectivity"]
    # the same words with labels that carry nothing: no selectivity left to find
    rng = torch.Generator().manual_seed(3)
    words = ANIMALS + OTHERS[:9]
    shuffled = [(w, "ab"[int(b)]) for w, b in zip(words, torch.randperm(18, generator=rng) % 2, strict=True)]
    noise = probe(probe_cfg(concept_file(tmp_path, shuffled)), tmp_path / "noise", enc)
    assert abs(noise["probe/selectivity"]) <= 0.3 and noise["probe/accuracy"] < summary["probe/accuracy"]


def test_builtin_concepts_are_words_against_frequency_matched_others():
    from transformers import AutoTokenizer
    from wordfreq import zipf_frequency

    from ft.model.encoder import packaged_minilm_path

    tok = AutoTokenizer.from_pretrained(str(packaged_minilm_path()))  # the packaged MiniLM's vocabulary

    for name in BUILTIN:
        c = load_concept(f"builtin:{name}", tok)
        pos = [w for w, lab in zip(c.words, c.flat_labels, strict=True) if lab == "1"]
        neg = [w for w, lab in zip(c.words, c.flat_labels, strict=True) if lab == "0"]
        assert len(neg) == 3 * len(pos) and not set(pos) & set(neg) and len(set(neg)) == len(neg)
        gap = abs(sum(zipf_frequency(w, "en") for w in pos) / len(pos) - sum(zipf_frequency(w, "en") for w in neg)
                  / len(neg))
        assert gap < 0.5, (name, gap)  # frequency-matched


@pytest.mark.parametrize("spec,message", [
    ("builtin:planets", "valid: builtin:months"),
    ("/no/such.csv", "no such file"),
])
def test_bad_concepts_are_refused_in_one_line(tiny, tmp_path, spec, message):
    with pytest.raises(ConfigError, match=message):
        load_concept(spec, tiny.tokenizer)
    bad = tmp_path / "one_label.csv"
    bad.write_text("cat,1\ndog,1\n")
    with pytest.raises(ConfigError, match="at least 2 labels"):
        load_concept(str(bad), tiny.tokenizer)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("cat,1\ndog,1\nzebra,0\nyak,0\n")
    with pytest.raises(ConfigError, match=r"\['zebra', 'yak'\] are not single tokens"):
        load_concept(str(unknown), tiny.tokenizer)


def test_sentences_are_read_in_context(tiny, tmp_path):
    """A .conll concept: each word at its first piece, in its sentence."""
    from ft.measure.probe import concept_activations
    from tests.reference import hf_points

    conll = tmp_path / "c.conll"
    conll.write_text("the\tO\ncat\tA\nsat\tO\n\na\tO\ndog\tA\nwalking\tO\n")
    c = load_concept(str(conll), tiny.tokenizer)
    acts = concept_activations(tiny, c, "resid", [0, 1])
    assert acts.shape == (6, 2 * 32)
    enc = tiny.tokenizer(["a", "dog", "walking"], is_split_into_words=True, return_tensors="pt")
    first = [enc.word_ids().index(i) for i in range(3)]
    with torch.no_grad():
        want = hf_points(tiny.model, **enc)["resid"]
    torch.testing.assert_close(acts[3:, 32:], want[1][0, first])


def test_probe_selected_targets_are_textualized_and_scored_against_the_concept(tiny, tiny_dir, tmp_path):
    from ft.rundir.results import read_summary, read_targets
    from ft.train import run
    from tests.test_train import compose_cfg

    enc = planted_encoder(tiny)
    labels = [(w, "1") for w in ANIMALS] + [(w, "0") for w in OTHERS[:9]]
    probe(probe_cfg(concept_file(tmp_path, labels)), tmp_path / "probe", enc)
    cfg = compose_cfg([f"model.name_or_path={tiny_dir}", "target=probe", f"target.run={tmp_path / 'probe'}",
                       "target.k=3", "trainer.max_steps=5", "trainer.accelerator=cpu", "logger.wandb.mode=disabled",
                       "+trainer.enable_progress_bar=false"])
    summary = run(cfg, tmp_path / "run", enc)
    df = read_targets(tmp_path / "run")
    assert list(df.kind) == ["probe", "probe"]  # one spelling: target.kind=probe makes probe targets
    mean, weighted = df.spec
    assert mean.startswith(f"(layer.0.resid.{PLANTED} + ") and mean.endswith(") / 3")
    assert weighted.split(" * ")[1].split()[0] == f"layer.0.resid.{PLANTED}" and not weighted.startswith("-")
    assert df.concept_maw.all()  # the planted unit's most activating word is an animal
    assert list(df.label) == ["probe animals.csv k=3 mean", "probe animals.csv k=3 weighted"]
    assert summary["probe/maw_in_concept"] == 1.0
    assert read_summary(tmp_path / "run")["probe/closest_in_concept"] == pytest.approx(df.concept_closest_share.mean())
    from ft.cli.report import build_report
    from tests.test_report import table_rows

    html = build_report([str(tmp_path / "run")], tmp_path / "report.html", words=100).read_text()
    rows = table_rows(html, "concepts-table")
    assert [r[1] for r in rows] == list(df.label) and [r[3] for r in rows] == ["True", "True"]
    assert [float(r[4]) for r in rows] == pytest.approx(list(df.concept_closest_share), abs=1e-3)
    with pytest.raises(ConfigError, match="not an ft.probe run directory"):
        run(compose_cfg([f"model.name_or_path={tiny_dir}", "target=probe", f"target.run={tmp_path}"]),
            tmp_path / "bad", enc)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablating_the_planted_neuron_costs_more_than_random_neurons(tiny, tmp_path, mode):
    import pandas as pd

    enc = planted_encoder(tiny)
    labels = [(w, "animal") for w in ANIMALS] + [(w, "other") for w in OTHERS[:9]]
    summary = probe(probe_cfg(concept_file(tmp_path, labels), "ablate.top=1", "ablate.seeds=6",
                              f"ablate.mode={mode}"), tmp_path / "run", enc)
    drops = pd.read_parquet(tmp_path / "run" / "ablation.parquet")
    assert list(drops.set) == ["top"] + ["random"] * 6
    assert drops.sites[0] == f"layer.0.resid.{PLANTED}" and f"layer.0.resid.{PLANTED}" not in " ".join(drops.sites[1:])
    assert len(set(drops.sites[1:])) > 1  # the draws differ
    assert summary["ablate/probe_base"] == pytest.approx(summary["probe/accuracy"])
    assert summary["ablate/probe_drop"] >= 0.3
    assert summary["ablate/probe_drop"] > summary["ablate/probe_drop_random_mean"] + 0.2
    assert "ablate/mlm_base" not in summary  # a bare encoder: no masked-token drop


def test_the_masked_token_drop_is_measured_with_the_checkpoints_head(tiny_dir, tmp_path):
    """A masked-LM checkpoint: its accuracy (batched, padded) equals a sentence-by-sentence count,
    and ablating the whole last layer's residual stream changes what it predicts."""
    import pandas as pd
    from transformers import AutoTokenizer, BertForMaskedLM

    from ft.data.corpus import load_corpus
    from ft.measure.probe_ablation import masked_tokens
    from ft.model.encoder import load_encoder

    torch.manual_seed(0)
    mlm = BertForMaskedLM.from_pretrained(str(tiny_dir))
    mlm.save_pretrained(tmp_path / "mlm")
    AutoTokenizer.from_pretrained(str(tiny_dir)).save_pretrained(tmp_path / "mlm")
    enc = load_encoder(str(tmp_path / "mlm"))
    assert type(enc.head).__name__ == "BertForMaskedLM"
    words = ANIMALS + OTHERS[:9]
    sites = "[" + ",".join(f"layer.1.resid.{u}" for u in range(32)) + "]"
    summary = probe(probe_cfg(concept_file(tmp_path, [(w, "a" if w in ANIMALS else "b") for w in words]),
                              f"ablate.sites={sites}", "ablate.seeds=0", "ablate.mlm_sentences=12"),
                    tmp_path / "run", enc)
    tok = enc.tokenizer
    data = masked_tokens(load_corpus("packaged:lee", tok, max_tokens=14).ids[:12], tok.cls_token_id,
                         tok.sep_token_id, tok.mask_token_id, tok.pad_token_id, seed=0)
    hits = total = 0
    with torch.no_grad():
        for i in range(len(data.ids)):
            n = int(data.attention[i].sum())
            logits = enc.head(input_ids=data.ids[i : i + 1, :n]).logits[0]
            m = data.masked[i, :n]
            hits += int((logits.argmax(-1)[m] == data.targets[i, :n][m]).sum())
            total += int(m.sum())
    assert summary["ablate/mlm_base"] == pytest.approx(hits / total)
    assert total >= 12
    row = pd.read_parquet(tmp_path / "run" / "ablation.parquet").iloc[0]
    assert row.set == "sites" and row.units == 32
    # the last layer's output all zero: the head sees one constant vector, one prediction everywhere
    with torch.no_grad():
        const = enc.head.cls(torch.zeros(1, 1, 32)).argmax(-1).item()
    want = float((data.targets[data.masked] == const).float().mean())
    assert row.mlm_accuracy == pytest.approx(want)


def test_bad_ablation_settings_are_refused(tiny, tmp_path):
    enc = planted_encoder(tiny)
    labels = [(w, "animal") for w in ANIMALS] + [(w, "other") for w in OTHERS[:9]]
    path = concept_file(tmp_path, labels)
    for extra, message in (("ablate.mode=half", "ablate.mode='half'; valid"),
                           ("ablate.top=99", "ablate.top=99; valid: 1..31"),
                           ("ablate.sites=[layer.7.resid.1]", "ablate.sites: .*out of range"),
                           ("ablate.mlm=/nowhere", "ablate.mlm='/nowhere': no such directory")):
        with pytest.raises(ConfigError, match=message):
            probe(probe_cfg(path, extra), tmp_path / "bad", enc)
        assert not (tmp_path / "bad").exists()


def test_a_probe_run_keeps_its_concept_file_and_reads_the_copy(tiny, tiny_dir, tmp_path):
    """The concept file edited after the probe run: the run's concept words come from its kept
    copy; an altered copy is refused by name."""
    from ft.cli.probe_run import probe
    from ft.core.integrity import RunFileError
    from ft.measure.probe import concept_words
    from ft.rundir.kept import kept

    enc = planted_encoder(tiny)
    labels = [(w, "1") for w in ANIMALS] + [(w, "0") for w in OTHERS[:9]]
    path = concept_file(tmp_path, labels)
    probe(probe_cfg(path, "ablate.top=0"), tmp_path / "probe", enc)
    words = concept_words(tmp_path / "probe", tiny.tokenizer)
    assert words == set(ANIMALS)
    open(path, "w").write("word,label\n" + "".join(f"{w},1\n" for w in OTHERS[:9]) + f"{ANIMALS[0]},0\n")
    assert concept_words(tmp_path / "probe", tiny.tokenizer) == words  # the copy, not the edited file
    copy = kept(tmp_path / "probe", "concept")
    assert copy is not None and copy.read_text().startswith("word,label")
    copy.write_text(copy.read_text() + "zebra,1\n")
    with pytest.raises(RunFileError, match="was altered"):
        concept_words(tmp_path / "probe", tiny.tokenizer)
    copy.write_text(copy.read_text().removesuffix("zebra,1\n"))
    # a run textualizing the probe's units keeps (and scores with) the probe's copy, not the edited file
    from ft.rundir.kept import fingerprint
    from ft.train import run
    from tests.test_train import compose_cfg

    cfg = compose_cfg([f"model.name_or_path={tiny_dir}", "target=probe", f"target.run={tmp_path / 'probe'}",
                       "target.k=3", "trainer.max_steps=2", "trainer.accelerator=cpu", "logger.wandb.mode=disabled",
                       "+trainer.enable_progress_bar=false"])
    run(cfg, tmp_path / "run", enc)
    assert fingerprint(kept(tmp_path / "run", "concept")) == fingerprint(copy)
    assert concept_words(tmp_path / "probe", tiny.tokenizer, tmp_path / "run") == words
