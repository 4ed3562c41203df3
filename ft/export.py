"""`python -m ft.export RUN_DIR... --format hf|neuronpedia -o DIR`: runs in formats others load.

- `hf`: `DIR/data/train-00000-of-00001.parquet`, one row per target of every run (model, sites,
  `label`, texts, metrics, SAE `latent`/`sae_path`/`sae_post`, the optimized input), and
  `DIR/README.md`, a dataset card whose YAML header names the data files, models, configs,
  metrics and the ft version. Hugging Face `datasets` reads it: `load_dataset("parquet",
  data_dir=DIR)` or `load_dataset(DIR)`.
- `neuronpedia`: what Neuronpedia's importer reads (hijohnnylin/neuronpedia,
  apps/webapp/app/api/admin/import/route.ts and lib/db/import.ts), laid out as its dataset bucket
  (`v1/`) is, one folder per model and source:

      DIR/config/explanation_type.jsonl         the explanation type the explanations name
      DIR/config/explanation_model_type.jsonl   their explanationModelName rows
      DIR/<modelId>/<sourceId>/release.jsonl    SourceRelease
      DIR/<modelId>/<sourceId>/model.jsonl      Model
      DIR/<modelId>/<sourceId>/sourceset.jsonl  SourceSet
      DIR/<modelId>/<sourceId>/source.jsonl     Source
      DIR/<modelId>/<sourceId>/features/batch-<i>.jsonl.gz      Neuron rows
      DIR/<modelId>/<sourceId>/activations/batch-<i>.jsonl.gz   Activation rows
      DIR/<modelId>/<sourceId>/explanations/batch-<i>.jsonl.gz  Explanation rows
      DIR/<modelId>/<sourceId>/ft.jsonl         ft's own record per target (not imported)

  The gzipped tables are inserted with the FIRST line's keys as columns, so every line has the
  same keys; ids (`Activation.id`, `Explanation.id`, no database default) are derived from what
  they identify (the same export twice is byte for byte the same, and re-importing adds nothing).
  The importer upserts the two `config/` tables from its own config folder: copy those lines
  there (or insert them) before importing, or the explanations' type is unknown to it.
  Every creator and author is `--creator-id`, by default the bot user every Neuronpedia
  instance seeds (`clkht01d40000jv08hvalcvly`, apps/webapp/prisma/seed.ts).

  Source ids follow Neuronpedia's `<layer>-<set>[__<more>]` convention (lib/utils/source.ts):
  a single unit `layer.L.<point>.U` is index `U` of source `L-ft-<point>` (`3-ft-ffn_out`,
  `5-ft-head`); an SAE latent is index `<latent>` of `L-ft-sae-<point>-<d_sae>`
  (`3-ft-sae-resid-16384`; where one export holds two different SAEs of one site and width,
  each gets `__<sha256 of its weights, 8 hex>`); units that exist only in their run (groups,
  clusters, terms and probes, directions) are index `<target_id>` of `L-ft-<kind>__<run>`, L
  their highest layer. The same unit textualized by two runs is one Neuron with one explanation
  per run (its `notes` name the run and target). Activation values are ft's objective for the
  unit (for an SAE latent its pre-activation), over the top `--top-n` sentences of `--corpus`; a
  diverged target keeps its feature and activations and gets no explanation (said on stderr).

Runs are named `<run_name>-<folder>`; two runs of one name each get `-<6 hex of their path>`, and
a run reached by two paths is exported once. The corpus statistics (top sentences, max
activation, share of tokens above 0) are computed here, over `--corpus` (default the packaged Lee
corpus), with the run's own model, refused if its files changed since the run; an SAE is read
from the run's kept copy (`ft.rundir.kept`), never from a file that may have changed since.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from ft.cli.export_files import check_out, distinct, export_hf, finished
from ft.cli.neuronpedia import CREATOR_ID, export_neuronpedia
from ft.core.errors import ConfigError, FtError
from ft.core.signals import stops_in_one_line
from ft.data.corpus import DEFAULT_CORPUS

log = logging.getLogger("ft")
FORMATS = ("hf", "neuronpedia")


@stops_in_one_line("ft.export")
def main(argv: list[str] | None = None) -> int:
    from ft.cli.preflight import OneLineParser

    p = OneLineParser(prog="python -m ft.export", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="finished run directories (or folders above them)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("-o", "--out", required=True, help="a new or empty folder")
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="neuronpedia: the corpus of the top activations")
    p.add_argument("--top-n", type=int, default=5, help="neuronpedia: top sentences per target")
    p.add_argument("--max-sentences", type=int, default=2000, help="neuronpedia: corpus sentences scanned")
    p.add_argument("--creator-id", default=CREATOR_ID,
                   help="neuronpedia: the user id every row names as creator/author (default: the seeded bot user)")
    a = p.parse_args(argv)
    from ft.core.chatter import configure_output
    from ft.rundir.results import expand

    configure_output("info")
    try:
        out = Path(a.out)
        check_out(out)
        from ft.cli.preflight import refuse_in_run, refuse_inside

        refuse_in_run(out, "-o", "a new or empty folder")
        if a.top_n < 1 or a.max_sentences < 1:
            raise ConfigError(f"--top-n {a.top_n}, --max-sentences {a.max_sentences}; valid: integers >= 1")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", a.creator_id):
            raise ConfigError(f"--creator-id {a.creator_id!r}; valid: a Neuronpedia user id (letters, digits, - or _)")
        runs = distinct(finished(Path(r)) for r in expand(a.runs))
        if not runs:
            raise ConfigError(f"no run directories under {a.runs}")
        refuse_inside(out, runs, "-o", "a new or empty folder")  # an export never lands among a run's files
        if a.format == "hf":
            export_hf(runs, out)
        else:
            export_neuronpedia(runs, out, a.corpus, a.top_n, a.max_sentences, a.creator_id)
    except (FtError, OSError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"{a.format} export of {len(runs)} runs: {out}")
    return 0


def __getattr__(name: str) -> object:  # a name that moved to another module still imports (ft.core.moved)
    from ft.core.moved import moved_attribute

    return moved_attribute(__name__, name)


if __name__ == "__main__":
    sys.exit(main())
