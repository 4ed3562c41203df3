"""`python -m ft.export RUN_DIR... --format hf|neuronpedia -o DIR`: runs in formats others load.

- `hf`: `DIR/data/train-00000-of-00001.parquet`, one row per target of every run (model, sites,
  texts, metrics, the optimized input), and `DIR/README.md`, a dataset card whose YAML header
  names the data files, models, configs, metrics and the ft version. Hugging Face `datasets`
  reads it: `load_dataset("parquet", data_dir=DIR)` or `load_dataset(DIR)`.
- `neuronpedia`: `DIR/<run>/<target_id>.json` per target, in the shape of Neuronpedia's feature
  (`Neuron`) and `Activation` records (hijohnnylin/neuronpedia, apps/webapp/prisma/schema.prisma;
  the webapp's GET /api/feature/{modelId}/{layer}/{index} answers in this shape):
  `modelId`, `layer` (the source, e.g. `3-ft-ffn_out`), `index`, `maxActApprox`, `frac_nonzero`,
  `pos_str`/`pos_values`/`neg_str`/`neg_values` (the static readings with their E.v scores, for
  single FFN and hidden-width units), `activations` (the top corpus sentences with per-token
  activations, `maxValue`, `maxValueTokenIndex`, `minValue`, `binMin`/`binMax`/`binContains`) and
  `explanations` (the textualization: the searched text, else the closest words). ft's own
  fields go under `ft`.

The corpus statistics (top sentences, max activation, share of tokens above 0) are computed here,
over `--corpus` (default the packaged Lee corpus), with the run's own model.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import ft
from ft.corpus import DEFAULT_CORPUS, load_corpus
from ft.errors import ConfigError, FtError
from ft.results import read_config, read_inputs, read_summary, read_targets, target_label

log = logging.getLogger("ft")
FORMATS = ("hf", "neuronpedia")
DATA_FILE = "data/train-00000-of-00001.parquet"


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"-o {out}: exists and is not an empty folder; valid: a new or empty folder")


def finished(run_dir: Path) -> Path:
    if not (run_dir / "targets.parquet").exists():
        raise ConfigError(f"{run_dir} is not a finished ft run (no targets.parquet)")
    return run_dir


def run_label(run_dir: Path) -> str:
    cfg = read_config(run_dir)
    from ft.hydra_conf import dirname

    return f"{dirname(cfg.get('run_name'), cfg.experiment_name)}-{run_dir.name}"


# -- hf ---------------------------------------------------------------------------------------------
def hf_rows(run_dir: Path) -> pd.DataFrame:
    """One row per target: what it is, what it became, its metrics, its optimized input."""
    cfg, targets, inputs = read_config(run_dir), read_targets(run_dir), read_inputs(run_dir)
    keep = [c for c in ("target_id", "kind", "sites", "spec", "layer", "target_word", "k", "selection",
                        "objective", "most_activating_word", "most_activating_word_activation", "closest_words",
                        "closest_cos", "snapped_tokens", "snapped_activation", "text", "token_ids", "fluency",
                        "static_promotes", "static_suppresses", "static_detects", "steps", "converged",
                        "diverged") if c in targets]
    df = targets[keep].copy()
    df.insert(0, "label", [target_label(r) for r in targets.itertuples()])
    df.insert(0, "model", str(cfg.model.name_or_path))
    df.insert(0, "run", run_label(run_dir))
    df["input_kind"], df["input_length"] = str(cfg.input.kind), int(cfg.input.length)
    for name in ("embeds", "analysis"):
        if name in inputs and len(inputs[name]) == len(df):
            df[name] = [inputs[name][i].float().tolist() for i in range(len(df))]  # rows as in the table
    return df


def card(rows: pd.DataFrame, runs: list[Path]) -> str:
    """A dataset card: YAML metadata (data files, models, configs, metrics, ft version) and how the
    data was made."""
    import yaml

    configs = {run_label(r): json.loads(json.dumps(dict(read_config(r)), default=str)) for r in runs}
    meta = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILE}]}],
        "tags": ["interpretability", "feature-textualization", "activation-maximization", "ft"],
        "pretty_name": "ft textualizations",
        "size_categories": ["n<1K" if len(rows) < 1000 else "1K<n<10K" if len(rows) < 10_000 else "10K<n<100K"],
        "ft_version": ft.__version__,
        "models": sorted(set(rows.model)),
        "runs": [{"name": run_label(r), "experiment": str(read_config(r).experiment_name),
                  "metrics": {k: v for k, v in read_summary(r).items() if isinstance(v, (int, float))}}
                 for r in runs],
    }
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    body = [f"# ft textualizations ({len(rows)} targets, {len(runs)} runs)", "",
            "Each row is one target (a neuron, a group, an expression over units, a direction, an SAE latent ...)"
            " of a frozen BERT-family encoder, and the input that ft (feature textualization: activation "
            "maximization) optimized for it: `embeds` (the optimized input embeddings, [length, width]), the "
            "nearest words (`closest_words`, `closest_cos`), the most activating vocabulary word, and, for "
            "token search, the searched `text`.", "",
            f"Made with ft {ft.__version__} (`python -m ft.export ... --format hf`). Each run's full config:", ""]
    for name, c in configs.items():
        body += [f"## {name}", "", "```yaml", yaml.safe_dump(c, sort_keys=False).rstrip(), "```", ""]
    body += ["Load it with `datasets.load_dataset(\"parquet\", data_dir=...)` or `datasets.load_dataset(path)`."]
    return f"---\n{head}---\n\n" + "\n".join(body) + "\n"


def export_hf(runs: list[Path], out: Path) -> Path:
    rows = pd.concat([hf_rows(r) for r in runs], ignore_index=True)

    def write(tmp: Path) -> None:
        (tmp / "data").mkdir()
        rows.to_parquet(tmp / DATA_FILE, index=False)
        (tmp / "README.md").write_text(card(rows, runs))

    return publish(out, write)


def publish(out: Path, write) -> Path:
    """Write into a temporary sibling folder, then move it into place: nothing half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            out.rmdir()  # empty (check_out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -- neuronpedia ------------------------------------------------------------------------------------
def corpus_stats(scorer, corpus, top_n: int, limit: int) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """(max [targets], frac_nonzero [targets], top sentence indices per target) over the corpus."""
    from ft.bars import bar
    from ft.examples import merge_top

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
    from ft.sites import Site
    from ft.static import unit_vectors, vocab_matrix

    try:
        s = Site.parse(site_text)
    except FtError:
        return {}
    vectors = unit_vectors(model, s.layer, s.point, torch.tensor([s.unit]))
    if vectors is None:
        return {}
    scores = (vectors[0] @ vocab_matrix(model, vocab.ids).T)[0]
    hi, lo = scores.topk(k), scores.topk(k, largest=False)
    return {"pos_str": [vocab.tokens[int(i)] for i in hi.indices], "pos_values": [float(v) for v in hi.values],
            "neg_str": [vocab.tokens[int(i)] for i in lo.indices], "neg_values": [float(v) for v in lo.values]}


def source_of(row) -> tuple[str, str]:
    """(layer, index) in Neuronpedia's sense: a single unit is `L-ft-point` and its unit; anything
    else `ft-kind` and the target's id."""
    sites = list(row.sites)
    if row.kind == "neuron" and len(sites) == 1:
        _, layer, point, unit = sites[0].split(".")
        return f"{layer}-ft-{point}", unit
    return f"ft-{row.kind}", str(int(row.target_id))


def export_neuronpedia(runs: list[Path], out: Path, corpus: str = DEFAULT_CORPUS, top_n: int = 5,
                       max_sentences: int = 2000) -> Path:
    from ft.encoder import load_encoder
    from ft.examples import TargetScorer
    from ft.targets import readouts_of_table
    from ft.vocab import Vocabulary

    docs: dict[str, list[tuple[str, dict]]] = {}
    for run_dir in runs:
        cfg, targets = read_config(run_dir), read_targets(run_dir).sort_values("target_id")
        if "logit" in set(targets.kind):
            raise ConfigError(f"{run_dir}: class-logit targets have no per-token activations; valid: runs of "
                              "units (neurons, groups, terms, directions, SAE latents)")
        encoder = load_encoder(cfg.model.name_or_path, cfg.model.trust_remote_code)
        from ft.results import read_directions

        scorer = TargetScorer(encoder, readouts_of_table(encoder.model, targets, read_directions(run_dir)))
        longest = type(encoder.arch).max_tokens(encoder.model.config)  # with its two framing tokens
        text = load_corpus(corpus, encoder.tokenizer, max_tokens=64 if longest is None else min(64, longest - 2))
        mx, frac, top = corpus_stats(scorer, text, top_n, max_sentences)
        vocab = Vocabulary.from_tokenizer(encoder.tokenizer)
        model_id = str(cfg.model.name_or_path).replace("packaged:", "").replace("/", "_")
        label = run_label(run_dir)
        items = []
        for t, row in enumerate(targets.itertuples()):
            layer, index = source_of(row)
            seqs = [text.ids[j] for j in top[t]]
            values = scorer.batch(seqs, torch.tensor([t]))[..., 0] if seqs else torch.zeros(0, 0)
            acts = []
            for j, seq, v in zip(top[t], seqs, values, strict=True):
                v = v[: len(seq)]
                acts.append({"modelId": model_id, "layer": layer, "index": index,
                             "tokens": encoder.tokenizer.convert_ids_to_tokens(seq), "values": [float(x) for x in v],
                             "maxValue": float(v.max()), "maxValueTokenIndex": int(v.argmax()),
                             "minValue": float(v.min()), "binMin": -1, "binMax": float(mx[t]), "binContains": -1,
                             "dataSource": corpus, "dataIndex": str(j)})
            text_in = getattr(row, "text", None)
            description = text_in if isinstance(text_in, str) else ", ".join(list(row.closest_words)[:10])
            doc = {"modelId": model_id, "layer": layer, "index": index, "maxActApprox": float(mx[t]),
                   "frac_nonzero": float(frac[t]), "pos_str": [], "pos_values": [], "neg_str": [], "neg_values": [],
                   "activations": acts,
                   "explanations": [{"description": description, "typeName": "ft-textualization",
                                     "explanationModelName": f"ft {ft.__version__} input={cfg.input.kind}"}],
                   "ft": {"run": label, "target": target_label(row), "kind": row.kind, "sites": list(row.sites),
                          "spec": row.spec if isinstance(getattr(row, "spec", None), str) else None,
                          "objective": float(row.objective),
                          "most_activating_word": row.most_activating_word,
                          "closest_words": list(row.closest_words), "closest_cos": [float(c) for c in row.closest_cos],
                          "text": text_in if isinstance(text_in, str) else None}}
            if row.kind == "neuron" and len(row.sites) == 1:
                doc |= static_values(encoder.model, vocab, row.sites[0])
            items.append((f"{int(row.target_id)}.json", doc))
        docs[label] = items

    def write(tmp: Path) -> None:
        for label, items in docs.items():
            (tmp / label).mkdir()
            for name, doc in items:
                (tmp / label / name).write_text(json.dumps(doc, indent=1, allow_nan=False))

    return publish(out, write)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ft.export", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="finished run directories (or folders above them)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("-o", "--out", required=True, help="a new or empty folder")
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="neuronpedia: the corpus of the top activations")
    p.add_argument("--top-n", type=int, default=5, help="neuronpedia: top sentences per target")
    p.add_argument("--max-sentences", type=int, default=2000, help="neuronpedia: corpus sentences scanned")
    a = p.parse_args(argv)
    from ft.chatter import configure_output
    from ft.results import expand

    configure_output("info")
    try:
        out = Path(a.out)
        check_out(out)
        if a.top_n < 1 or a.max_sentences < 1:
            raise ConfigError(f"--top-n {a.top_n}, --max-sentences {a.max_sentences}; valid: integers >= 1")
        runs = [finished(Path(r)) for r in expand(a.runs)]
        if not runs:
            raise ConfigError(f"no run directories under {a.runs}")
        if a.format == "hf":
            export_hf(runs, out)
        else:
            export_neuronpedia(runs, out, a.corpus, a.top_n, a.max_sentences)
    except FtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.format} export of {len(runs)} runs: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
