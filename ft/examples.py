"""Dataset examples beside the optimized inputs: `python -m ft.examples RUN_DIR`.

For every target of a run (a neuron or a group; its activation at a token is the mean of
its sites there, as in the objective):
1. corpus search (Poerner et al.'s baseline): the top-n sentences by the target's maximum
   over token positions, and the top-n n-grams (n = the run's input length) read as
   ``[CLS] n-gram [SEP]`` at the run's position, as the optimized input is;
2. a minimal activating example (Foote): from the best sentence, with the anchor token
   where it peaks, cut tokens from the end, then from the start, keeping the shortest span
   whose anchor activation dropped by at most `mae_drop` (paper: 60%), `window` tokens
   around the anchor always kept; cuts fall between words, never inside one;
3. local search (Foote): every non-stopword token of the MAE replaced by each of n
   substitutes (a masked LM's predictions, or nearest embeddings when no masked LM is
   available); a variant is *positive* when the anchor activation dropped by less than
   `pos_drop` (40%), *negative* when by more than `neg_drop` (70%).

Writes ``examples.parquet`` in the run directory (one row per example) and logs the
examples and a per-target comparison as tables to the run's W&B run.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pandas as pd

from ft.core.errors import FtError
from ft.core.signals import stops_in_one_line
from ft.data.corpus import DEFAULT_CORPUS
from ft.measure.examples import EXAMPLES, log_to_wandb, run_examples, summarize, target_labels
from ft.rundir.results import atomic_write, read_targets


@stops_in_one_line("ft.examples")
def main(argv: list[str] | None = None) -> int:
    from ft.cli.preflight import OneLineParser

    p = OneLineParser(prog="python -m ft.examples", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a finished ft run directory")
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help=f"default {DEFAULT_CORPUS}; a .txt file, a folder, "
                   "or hf:PATH[:COLUMN]")
    p.add_argument("--top-n", type=int, default=5, help="sentences and n-grams kept per target")
    p.add_argument("--ngram", type=int, default=None, help="n-gram length (default: the run's input length; 0: off)")
    p.add_argument("--limit", type=int, default=None, help="only N targets, spread evenly over the run")
    p.add_argument("--mae-drop", type=float, default=0.6, help="pruning keeps the anchor within this drop")
    p.add_argument("--window", type=int, default=0, help="tokens kept either side of the anchor")
    p.add_argument("--pos-drop", type=float, default=0.4, help="positive example: drop below this")
    p.add_argument("--neg-drop", type=float, default=0.7, help="negative example: drop above this")
    p.add_argument("--substitutes", type=int, default=5, help="substitutes per word in local search (0: off)")
    p.add_argument("--mlm", default="auto", help="auto | nearest | a *ForMaskedLM name or path")
    p.add_argument("--max-tokens", type=int, default=64, help="sentences are cut to this many word pieces")
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ft.core.chatter import configure_output

    configure_output("info")  # no weight-loading bars from transformers: a refusal is one line
    from ft.cli.preflight import writable_place
    from ft.core.integrity import StorageError

    try:
        if Path(a.run_dir).is_dir():  # the examples go into the run: a place that cannot take them fails first
            writable_place(Path(a.run_dir) / EXAMPLES, "the examples to", "a run directory you can write "
                           "(copy the run to one)", folder=False)
        df, compare = run_examples(a.run_dir, a.corpus, a.top_n, a.ngram, a.limit, a.mae_drop, a.window,
                                   a.pos_drop, a.neg_drop, a.substitutes, a.mlm, a.max_tokens, a.batch_size)
        summary = summarize(compare)
        run_dir = Path(a.run_dir)
        atomic_write(run_dir / "examples_summary.json", lambda p: p.write_text(json.dumps(summary, indent=1)))
    except FtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk filled while writing: one line (atomic writes leave no half-written file)
        print(f"error: {e if isinstance(e, StorageError) else f'{a.run_dir}: {e.strerror or e}'}", file=sys.stderr)
        return 1
    log_to_wandb(run_dir, df, compare, summary)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(compare.drop(columns=["target_id"]).describe().loc[["mean", "std"]].round(3).to_string())
        show = df[df["kind"].ne("ngram")].groupby(["target_id", "kind"]).head(1).head(12).copy()
        show.insert(0, "target", show.target_id.map(target_labels(read_targets(run_dir))))
        print(show[["target", "kind", "activation", "anchor_token", "text"]].to_string(index=False))
    print(" ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in summary.items()))
    print(f"examples: {run_dir / EXAMPLES}")
    return 0


def __getattr__(name: str) -> object:  # a name that moved to another module still imports (ft.core.moved)
    from ft.core.moved import moved_attribute

    return moved_attribute(__name__, name)


if __name__ == "__main__":
    sys.exit(main())
