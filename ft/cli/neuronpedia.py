"""Neuronpedia's importer layout for a set of runs (config/*.jsonl, each model's sources, features,
activations and explanations as gzipped batches): written by `python -m ft.export --format
neuronpedia`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import ft
from ft.cli.export_files import distinct, gz, jsonl, label_of, run_labels, staging, write_files
from ft.core.errors import ConfigError, FtError
from ft.data.corpus import DEFAULT_CORPUS, load_corpus
from ft.rundir.results import read_config, read_targets
from ft.targets.registry import unit_kind

# -- neuronpedia: what a unit is called there --------------------------------------------------------
CREATOR_ID = "clkht01d40000jv08hvalcvly"  # the bot user Neuronpedia seeds (apps/webapp/prisma/seed.ts)

log = logging.getLogger("ft")


RELEASE = "ft"


EXPLANATION_TYPE = "ft-textualization"


BATCH = 4096  # lines per gzipped file


GZ_TABLES = ("features", "activations", "explanations")


SAFE_ID = re.compile(r"[^a-z0-9_-]+")


def model_id_of(name_or_path: str) -> str:
    """Neuronpedia's model id (letters, digits, `-`, `_`; lower case; at most 128): the packaged
    alias's name, else the last part of a hub name or path."""
    name = str(name_or_path).removeprefix("packaged:").rstrip("/").rsplit("/", 1)[-1]
    return SAFE_ID.sub("-", name.lower()).strip("-")[:128] or "model"


def run_tag(name: str) -> str:
    """A run's name as it can stand after `__` in a source id."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:80] or "run"


@dataclass(frozen=True)
class Unit:
    """Where a target lives in Neuronpedia: source `<layer>-<set_name>[__<more>]`, and its index."""

    layer: int
    set_name: str
    index: str
    more: str = ""

    @property
    def source(self) -> str:
        return f"{self.layer}-{self.set_name}" + (f"__{self.more}" if self.more else "")


def top_layer(row: object) -> int:
    """The layer of a single-layer row, else the highest layer its sites read."""
    layer = getattr(row, "layer", None)
    if layer is not None and layer == layer:
        return int(layer)
    layers = [int(s.split(".")[1]) for s in row.sites if re.match(r"^layer\.\d+\.", str(s))]
    return max(layers, default=0)


def is_latent(row: object) -> bool:
    """An SAE latent's row: it names its latent and the SAE it belongs to."""
    latent = getattr(row, "latent", None)
    return isinstance(getattr(row, "sae_path", None), str) and latent is not None and latent == latent


def unit_of(row: object, tag: str, d_sae: int | None) -> Unit:
    """A single unit and an SAE latent are the model's own units; any other target exists only in
    its run (its target id, in a source named after the run)."""
    sites = [str(s) for s in row.sites]
    if is_latent(row):
        _, layer, point = str(row.spec).split(".")[:3]
        return Unit(int(layer), f"ft-sae-{point}-{d_sae}", str(int(row.latent)))
    if unit_kind(row.kind).own_unit and len(sites) == 1 and len(sites[0].split(".")) == 4:
        _, layer, point, unit = sites[0].split(".")
        return Unit(int(layer), f"ft-{point}", unit)
    return Unit(top_layer(row), f"ft-{row.kind}", str(int(row.target_id)), tag)


def ident(*parts: object) -> str:
    """A cuid-shaped id (25 characters) derived from what it identifies."""
    return "c" + hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:24]


def finite(x: object) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# -- neuronpedia: reading a run ----------------------------------------------------------------------
@dataclass
class Entry:
    """One target of one run, before the tables are laid out."""

    model: dict
    model_path: str  # the run's model.name_or_path, resolved: two models never share an id
    unit: Unit
    feature: dict  # maxActApprox, frac_nonzero, pos/neg
    activations: list[dict]
    explanation: dict | None  # None: the target diverged
    record: dict  # ft.jsonl
    set_description: str
    sae_digest: str | None = None
    source_notes: str = ""
    prompts: int = 0  # corpus sentences scanned
    prompt_tokens: int = 64  # their longest, in word pieces


@dataclass
class SaeCopy:
    folder: Path
    d_sae: int
    digest: str
    recorded: str


def kept_input(run_dir: Path, role: str) -> Path | None:
    """`ft.rundir.kept.kept`: the run's verified input (RunFileError when it changed since the run), or None
    for a run that kept none."""
    try:
        from ft.rundir.kept import kept
    except ImportError:  # ft before runs kept their inputs
        return None
    return kept(run_dir, role)


def sae_copy(run_dir: Path, recorded: str) -> SaeCopy:
    """The SAE a run read: its kept copy (`ft.rundir.kept`, checked against the run), or, for a run made
    before runs kept their inputs, the recorded path with a warning that it may have changed."""
    from ft.core.integrity import sha256_file
    from ft.targets.sae_file import WEIGHTS, load_sae

    copy = kept_input(run_dir, "sae")
    if copy is None:
        log.warning("%s kept no copy of its SAE: reading target.path=%s as it is now (if it changed since the run, "
                    "the export differs from the run)", run_dir, recorded)
        folder = Path(recorded)
    else:
        folder = copy if Path(copy).is_dir() else Path(copy).parent
    sae = load_sae(folder)
    return SaeCopy(folder, sae.d_sae, sha256_file(folder / WEIGHTS), recorded)


def with_sae_copies(run_dir: Path, targets: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, SaeCopy]]:
    """The table with SAE rows pointing at the copies export reads; the copies by recorded path."""
    sae = pd.Series([is_latent(r) for r in targets.itertuples()], index=targets.index, dtype=bool)
    if not sae.any():
        return targets, {}
    copies = {p: sae_copy(run_dir, p) for p in sorted(set(targets.sae_path[sae]))}
    table = targets.copy()
    table.loc[sae, "sae_path"] = [str(copies[p].folder) for p in table.sae_path[sae]]
    return table, copies


def corpus_stats(scorer, corpus, top_n: int, limit: int) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """(max [targets], frac_nonzero [targets], top sentence indices per target) over the corpus."""
    from ft.core.bars import bar
    from ft.measure.examples import merge_top

    n_t = scorer.M.shape[1]
    order = sorted(range(min(limit, len(corpus))), key=lambda i: len(corpus.ids[i]))
    top = torch.full((n_t, 0), -float("inf"))
    kept = [torch.zeros((n_t, 0), dtype=torch.long)]
    above, total = torch.zeros(n_t), 0
    for i in bar(range(0, len(order), scorer.batch_size), desc="corpus", unit="batch"):
        idx = order[i : i + scorer.batch_size]
        acts = scorer.batch([corpus.ids[j] for j in idx])  # [B, T, targets], -inf at padding
        valid = torch.isfinite(acts[..., 0])
        above += (acts > 0).flatten(0, 1)[valid.flatten()].sum(0).float()
        total += int(valid.sum())
        best = acts.max(dim=1).values  # [B, targets]
        top, kept = merge_top(top, kept, best.T, [torch.tensor(idx).expand(n_t, -1)], top_n)
    return top[:, 0].numpy(), (above / max(total, 1)).numpy(), kept[0].tolist()


def static_values(model, vocab, site_text: str, k: int = 10) -> dict[str, list]:
    """pos_str/pos_values/neg_str/neg_values: the tokens with the largest and smallest E.v."""
    from ft.model.sites import Site
    from ft.model.static import unit_vectors, vocab_matrix

    empty: dict[str, list] = {"pos_str": [], "pos_values": [], "neg_str": [], "neg_values": []}
    if not site_text:
        return empty
    try:
        s = Site.parse(site_text)
    except FtError:
        return empty
    vectors = unit_vectors(model, s.layer, s.point, torch.tensor([s.unit]))
    if vectors is None:
        return empty
    scores = (vectors[0] @ vocab_matrix(model, vocab.ids).T)[0]
    hi, lo = scores.topk(k), scores.topk(k, largest=False)
    return {"pos_str": [vocab.tokens[int(i)] for i in hi.indices], "pos_values": [float(v) for v in hi.values],
            "neg_str": [vocab.tokens[int(i)] for i in lo.indices], "neg_values": [float(v) for v in lo.values]}


def model_row(name_or_path: str, arch: object) -> dict:
    """Neuronpedia's Model: a hub name shows as it is (its owner the part before `/`), a local
    folder by its name."""
    name = str(name_or_path)
    hub = name.count("/") == 1 and not Path(name).expanduser().exists()
    return {"id": model_id_of(name), "displayNameShort": model_id_of(name),
            "displayName": name if hub else model_id_of(name), "creatorId": CREATOR_ID, "layers": int(arch.num_layers),
            "neuronsPerLayer": int(arch.intermediate_size), "dimension": int(arch.hidden_size),
            "owner": name.split("/")[0] if hub else "ft",
            "visibility": "PUBLIC", "instruct": False, "inferenceEnabled": False}


def set_description(row: object, unit: Unit) -> str:
    if is_latent(row):
        return f"ft: SAE latents ({unit.set_name.removeprefix('ft-sae-')})"
    if unit.more:
        return f"ft: {row.kind} targets of one run"
    return f"ft: {unit.set_name.removeprefix('ft-')} units"


def record_of(row: object, name: str, unit: Unit, diverged: bool) -> dict:
    text = getattr(row, "text", None)
    spec = getattr(row, "spec", None)
    latent = getattr(row, "latent", None) if is_latent(row) else None
    return {"layer": unit.source, "index": unit.index, "run": name, "target_id": int(row.target_id),
            "label": label_of(row), "kind": str(row.kind), "sites": [str(s) for s in row.sites],
            "spec": spec if isinstance(spec, str) else None, "latent": None if latent is None else int(latent),
            "objective": finite(row.objective), "diverged": diverged,
            "most_activating_word": getattr(row, "most_activating_word", None),
            "closest_words": [str(w) for w in row.closest_words], "closest_cos": [finite(c) for c in row.closest_cos],
            "text": text if isinstance(text, str) else None}


def explanation_of(row: object, name: str, input_kind: str) -> dict:
    text = getattr(row, "text", None)
    description = text if isinstance(text, str) else ", ".join(str(w) for w in list(row.closest_words)[:10])
    notes = (f"ft {ft.__version__}; run {name}; target {int(row.target_id)} ({label_of(row)}); "
             f"objective {float(row.objective):.6g}; input={input_kind}")
    return {"description": description, "typeName": EXPLANATION_TYPE, "explanationModelName": f"ft-{input_kind}",
            "notes": notes}


def is_diverged(row: object) -> bool:
    """Flagged diverged by the run, or an objective that is not a finite number."""
    flag = getattr(row, "diverged", None)
    flagged = flag is not None and flag == flag and bool(flag)  # (NaN: a column older runs lack here)
    return flagged or finite(row.objective) is None


def top_activations(scorer, tokenizer, text, rows: list[int], t: int, corpus: str) -> list[dict]:
    """Target t's per-token values on the corpus sentences `rows` (its column alone)."""
    seqs = [text.ids[j] for j in rows]
    values = scorer.batch(seqs, torch.tensor([t]))[..., 0] if seqs else torch.zeros(0, 0)  # [sentences, T]
    acts = []
    for j, seq, v in zip(rows, seqs, values, strict=True):
        v = v[: len(seq)]
        acts.append({"tokens": tokenizer.convert_ids_to_tokens(seq), "values": [float(x) for x in v],
                     "maxValue": float(v.max()), "maxValueTokenIndex": int(v.argmax()), "minValue": float(v.min()),
                     "dataSource": corpus, "dataIndex": str(j)})
    return acts


def run_entries(run_dir: Path, name: str, corpus: str, top_n: int, max_sentences: int) -> list[Entry]:
    """Each target of one run: its unit, corpus statistics, top activations and explanation."""
    from ft.measure.examples import TargetScorer
    from ft.model.encoder import load_encoder
    from ft.model.vocab import Vocabulary
    from ft.rundir.results import read_directions
    from ft.targets import readouts_of_table

    cfg, targets = read_config(run_dir), read_targets(run_dir).sort_values("target_id")
    if "logit" in set(targets.kind):
        raise ConfigError(f"{run_dir}: class-logit targets have no per-token activations; valid: runs of "
                          "units (neurons, groups, terms, directions, SAE latents)")
    table, saes = with_sae_copies(run_dir, targets)
    from ft.rundir.kept import model_to_load

    # the folder the run read, verified (a model changed since is refused), found from any directory
    encoder = load_encoder(model_to_load(run_dir, cfg.model.name_or_path), cfg.model.trust_remote_code)
    scorer = TargetScorer(encoder, readouts_of_table(encoder.model, table, read_directions(run_dir)))
    longest = type(encoder.arch).max_tokens(encoder.model.config)  # with its two framing tokens
    prompt_tokens = 64 if longest is None else min(64, longest - 2)
    text = load_corpus(corpus, encoder.tokenizer, max_tokens=prompt_tokens)
    mx, frac, top = corpus_stats(scorer, text, top_n, max_sentences)
    vocab = Vocabulary.from_tokenizer(encoder.tokenizer)
    model = model_row(str(cfg.model.name_or_path), encoder.arch)
    local = Path(str(cfg.model.name_or_path)).expanduser()
    where = str(local.resolve()) if local.exists() else str(cfg.model.name_or_path)
    out = []
    for t, row in enumerate(targets.itertuples()):
        sae = saes.get(row.sae_path) if is_latent(row) else None
        unit = unit_of(row, run_tag(name), sae.d_sae if sae else None)
        acts = top_activations(scorer, encoder.tokenizer, text, top[t], t, corpus)
        if finite(mx[t]) is None or any(finite(x) is None for a in acts for x in a["values"]):
            raise ConfigError(f"{run_dir}: target {int(row.target_id)} ({label_of(row)}) has non-finite activations "
                              f"on {corpus}; valid: a model whose activations are finite")
        single = unit_kind(row.kind).static_readings and len(row.sites) == 1
        feature = {"maxActApprox": float(mx[t]), "frac_nonzero": float(frac[t]),
                   **static_values(encoder.model, vocab, str(row.sites[0]) if single else "")}
        diverged = is_diverged(row)
        if diverged:
            log.warning("%s: target %d (%s) diverged (objective %s): its feature and activations are exported, "
                        "its explanation is not", name, int(row.target_id), label_of(row), row.objective)
        explanation = None if diverged else explanation_of(row, name, str(cfg.input.kind))
        notes = f"SAE {sae.recorded} (sha256 {sae.digest[:12]})" if sae else f"run {name}" if unit.more else ""
        out.append(Entry(model, where, unit, feature, acts, explanation, record_of(row, name, unit, diverged),
                         set_description(row, unit), sae.digest if sae else None, notes,
                         min(max_sentences, len(text)), prompt_tokens))
    return out


def separate_saes(entries: list[Entry]) -> list[Entry]:
    """Two different SAEs that would share a source id each get `__<8 hex of their weights>`."""
    digests: dict[str, set[str]] = {}
    for e in entries:
        if e.sae_digest:
            digests.setdefault(e.unit.source, set()).add(e.sae_digest)
    shared = {s for s, d in digests.items() if len(d) > 1}
    out = []
    for e in entries:
        if e.unit.source in shared:
            unit = replace(e.unit, more=e.sae_digest[:8])
            e = replace(e, unit=unit, record={**e.record, "layer": unit.source})
        out.append(e)
    return out


# -- neuronpedia: the tables --------------------------------------------------------------------------
def source_tables(entries: list[Entry], creator: str, corpus: str) -> dict[str, list[dict]]:
    """The rows of one source folder (all entries share model and source)."""
    first = entries[0]
    model, unit = {**first.model, "creatorId": creator}, first.unit
    tables: dict[str, list[dict]] = {name: [] for name in ("features", "activations", "explanations", "ft")}
    tables["release"] = [{"name": RELEASE, "description": "Feature textualizations made with ft (activation "
                          "maximization over the input of a frozen BERT-family encoder)",
                          "descriptionShort": "ft textualizations", "creatorName": "ft", "creatorNameShort": "ft",
                          "creatorId": creator, "urls": [], "visibility": "PUBLIC"}]
    tables["model"] = [model]
    tables["sourceset"] = [{"modelId": model["id"], "name": unit.set_name, "description": first.set_description,
                            "creatorName": "ft", "creatorId": creator, "urls": [], "releaseName": RELEASE,
                            "visibility": "PUBLIC", "hasDashboards": True}]
    tables["source"] = [{"id": unit.source, "modelId": model["id"], "setName": unit.set_name, "creatorId": creator,
                         "hasDashboards": True, "visibility": "PUBLIC", "dataset": corpus,
                         "num_prompts": first.prompts, "num_tokens_in_prompt": first.prompt_tokens,
                         "notes": first.source_notes or first.set_description}]
    seen: set[str] = set()
    for e in entries:
        key = {"modelId": model["id"], "layer": unit.source, "index": e.unit.index}
        if e.unit.index not in seen:  # the same unit from another run: one Neuron, its explanations both kept
            seen.add(e.unit.index)
            tables["features"].append({**key, "sourceSetName": unit.set_name, "creatorId": creator, **e.feature})
            for a in e.activations:
                tables["activations"].append({"id": ident("Activation", *key.values(), a["dataSource"], a["dataIndex"]),
                                              **key, **a, "binMin": -1.0, "binMax": e.feature["maxActApprox"],
                                              "binContains": -1.0, "creatorId": creator})
        eid = None
        if e.explanation is not None:
            eid = ident("Explanation", *key.values(), e.record["run"], e.record["target_id"])
            tables["explanations"].append({"id": eid, **key, **e.explanation, "authorId": creator})
        tables["ft"].append({**e.record, "modelId": model["id"], "explanationId": eid})
    return tables


def config_tables(entries: list[Entry], creator: str) -> dict[str, list[dict]]:
    """The explanation type and explanation model rows the explanations name."""
    kinds = sorted({e.explanation["explanationModelName"] for e in entries if e.explanation})
    return {
        "explanation_type": [{"name": EXPLANATION_TYPE, "displayName": "ft textualization",
                              "description": "The input ft optimized to maximize the unit (activation maximization): "
                                             "the searched text, else the words closest to the optimized input",
                              "featured": False, "creatorName": "ft", "creatorId": creator}],
        "explanation_model_type": [{"name": k, "displayName": f"ft ({k.removeprefix('ft-')} input)",
                                    "description": f"ft's optimizer, input={k.removeprefix('ft-')}",
                                    "featured": False, "creatorName": "ft"} for k in kinds],
    }


def layout(entries: list[Entry], creator: str, corpus: str) -> dict[str, bytes]:
    """Relative path -> file content of the whole export."""
    models: dict[str, str] = {}
    for e in entries:
        known = models.setdefault(e.model["id"], e.model_path)
        if known != e.model_path:
            raise ConfigError(f"two models export as Neuronpedia model id {e.model['id']!r} ({known} and "
                              f"{e.model_path}); valid: export them separately")
    groups: dict[tuple[str, str], list[Entry]] = {}
    for e in entries:
        groups.setdefault((e.model["id"], e.unit.source), []).append(e)
    files: dict[str, bytes] = {}
    for name, lines in config_tables(entries, creator).items():
        if lines:
            files[f"config/{name}.jsonl"] = jsonl(lines)
    for (model_id, source), group in sorted(groups.items()):
        for name, lines in source_tables(group, creator, corpus).items():
            if name in GZ_TABLES:
                for i in range(0, len(lines), BATCH):
                    files[f"{model_id}/{source}/{name}/batch-{i // BATCH}.jsonl.gz"] = gz(jsonl(lines[i : i + BATCH]))
            elif lines:
                files[f"{model_id}/{source}/{name}.jsonl"] = jsonl(lines)
    return files


def export_neuronpedia(runs: list[Path], out: Path, corpus: str = DEFAULT_CORPUS, top_n: int = 5,
                       max_sentences: int = 2000, creator: str = CREATOR_ID) -> Path:
    runs = distinct(runs)
    with staging(out) as tmp:
        labels = run_labels(runs)
        entries = separate_saes([e for r in runs for e in run_entries(r, labels[r], corpus, top_n, max_sentences)])
        write_files(tmp, layout(entries, creator, corpus))
    return out
