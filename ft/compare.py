"""`python -m ft.compare`: do optimized texts beat the corpus, and at what cost in fluency?

For each length l, on the same neurons (default: the default experiment's 48 neurons spread
evenly down to 20, as `ft.examples --limit 20` picks them), one ft run per method:
- `tokens` (ft.engine.search) at every fluency weight (`search.fluency_weights`), each weight a point
  of the frontier;
- the continuous optimum (`input=embedding`), gumbel's argmax readout (`input=gumbel`) and PEZ
  (`input=projected`, the best projection seen);
and, from `ft.examples` on the token run, the best corpus n-gram of length l and the best corpus
sentence; at l = 1 the most activating word. Every text's fluency is the run's fluency model
(the bigram prior of the packaged corpus on the packaged MiniLM).

Writes OUT/comparison.parquet (one row per length and method), OUT/comparison.md and
OUT/report.html (the table, the frontiers, the runs) and prints the table.

Resumable: OUT/compare_state.json (the ledger) holds the arguments and each step's seconds, so a
comparison stopped by SIGTERM/SIGINT (exit 143/130, one line) continues where it stopped and
reports the seconds of every attempt; a finished one re-run changes nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import pandas as pd
import torch

from ft.core.errors import ConfigError, FtError
from ft.inputs import input_kind
from ft.measure.examples import of_type

log = logging.getLogger("ft")
CONFIG_DIR = str(files("ft.configs"))


def compose_run(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def comparison_sites(encoder: object, n: int) -> list[str]:
    """The default experiment's neurons, spread evenly down to `n` (ft.examples' --limit rule)."""
    from ft.cli.build import build_targets

    targets = build_targets(compose_run([]), encoder, None, None)
    if n < len(targets):
        targets = [targets[round(i * (len(targets) - 1) / max(n - 1, 1))] for i in range(n)]
    return [str(t.sites[0]) for t in targets]


LEDGER = "compare_state.json"


class Stopped(BaseException):  # noqa: N818 - what happened, not an error in the input
    """SIGTERM or SIGINT outside a run's fit (inside one, the run saves its checkpoint first). A
    BaseException, like KeyboardInterrupt: no `except Exception` on its way turns it into an error."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name}")


class Ledger:
    """OUT/compare_state.json: the comparison's arguments, the seconds of each finished step, the
    seconds spent so far in each unfinished one, and whether the tables were written."""

    def __init__(self, out: Path, args: dict[str, object]):
        self.path, self.args = out / LEDGER, args
        self.seconds: dict[str, float] = {}
        self.partial: dict[str, float] = {}
        self.done = False
        if self.path.exists():
            self.load()

    def load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            old, self.seconds, self.partial = data["args"], dict(data["seconds"]), dict(data["partial"])
            self.done = bool(data["done"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{self.path} is damaged ({type(e).__name__}); valid: delete it to start the "
                              "comparison over, or another --out") from None
        if old != self.args:
            key = next(k for k in sorted(set(old) | set(self.args)) if old.get(k) != self.args.get(k))
            raise ConfigError(f"--out {self.path.parent} holds a comparison made with --{key.replace('_', '-')}="
                              f"{old.get(key)!r}, this one has {self.args.get(key)!r}; valid: the same arguments, "
                              "or another --out")

    def save(self) -> None:
        from ft.core.files import atomic_write

        text = json.dumps({"args": self.args, "seconds": self.seconds, "partial": self.partial, "done": self.done},
                          indent=1, sort_keys=True)
        atomic_write(self.path, lambda p: p.write_text(text))

    def timed(self, key: str, work: Callable[[], object]) -> tuple[object, float]:
        """Run `work`; its seconds are those of every attempt (a finished step keeps its own)."""
        start = time.perf_counter()
        try:
            value = work()
        except BaseException as e:
            from ft.core.signals import Interrupted

            if isinstance(e, (Stopped, Interrupted)):
                self.partial[key] = self.partial.get(key, 0.0) + time.perf_counter() - start
                self.save()
            raise
        if key not in self.seconds:
            self.seconds[key] = self.partial.pop(key, 0.0) + time.perf_counter() - start
            self.save()
        return value, self.seconds[key]

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def timed_run(overrides: list[str], run_dir: Path, ledger: Ledger, key: str) -> float:
    """One ft run (a finished one is a no-op) and its seconds over every attempt."""
    from ft.cli.run import run

    return ledger.timed(key, lambda: run(compose_run(overrides), run_dir))[1]


def fluency_of_texts(fluency: object, ids: list[list[int]]) -> float:
    """Mean fluency of token sequences of one length (NaN when there are none)."""
    ids = [i for i in ids if i]
    if not ids:
        return math.nan
    return float(fluency.score(torch.tensor(ids)).mean())


def compare(out: Path, lengths: list[int], weights: list[float], n_targets: int, steps: int, search_steps: int,
            candidates: int, patience: int, model: str | None = None, ledger: Ledger | None = None) -> pd.DataFrame:
    from ft.measure.examples import run_examples
    from ft.measure.fluency import build_fluency, check_weights
    from ft.model.encoder import PACKAGED, load_encoder
    from ft.model.vocab import Vocabulary
    from ft.rundir.results import read_frontier, read_targets

    weights = check_weights(weights)
    for name, v in (("targets", n_targets), ("steps", steps), ("search-steps", search_steps),
                    ("candidates", candidates), ("patience", patience)):
        if v < 1:
            raise ConfigError(f"--{name}={v}; valid: an integer >= 1")
    top = input_kind("tokens").max_length
    if any(not 1 <= length <= top for length in lengths):
        raise ConfigError(f"--lengths={lengths}; valid: lengths in 1..{top}")
    model = model or PACKAGED
    ledger = ledger or Ledger(out, {})
    encoder = load_encoder(model)
    sites = comparison_sites(encoder, n_targets)
    fluency = build_fluency("auto", encoder, Vocabulary.from_tokenizer(encoder.tokenizer), model)
    tok = encoder.tokenizer
    common = [f"model.name_or_path={model}", f"target.sites=[{','.join(sites)}]", "logger.wandb.mode=disabled",
              "+trainer.enable_progress_bar=false", "print_rows=0"]
    w_list = f"[{','.join(f'{w:g}' for w in weights)}]"
    rows: list[dict] = []
    for length in lengths:
        base = [*common, f"input.length={length}"]
        d = out / f"l{length}"
        t_tok = timed_run([*base, "input=tokens", f"search.fluency_weights={w_list}", f"search.candidates={candidates}",
                           f"search.patience={patience}", f"trainer.max_steps={search_steps}"], d / "tokens", ledger,
                          f"l{length}/tokens")
        (_, corpus), t_ex = ledger.timed(f"l{length}/examples",
                                         lambda d=d, length=length: run_examples(d / "tokens", top_n=1, ngram=length,
                                                                                 substitutes=0))
        examples = pd.read_parquet(d / "tokens" / "examples.parquet")
        corpus = corpus.set_index("target_id")

        def row(method: str, act: pd.Series, seconds: float, flu: float, corpus: pd.DataFrame = corpus,
                length: int = length, **extra: object) -> dict:
            return table_row(length, corpus, method, act, seconds, flu, **extra)

        frontier = read_frontier(d / "tokens")
        for w, f in frontier.groupby("fluency_weight"):
            f = f.set_index("target_id")
            rows.append(row(f"tokens (w={w:g})", f.objective, t_tok, float(f.fluency.mean()), fluency_weight=w,
                            texts=" | ".join(f.text.head(3))))
        grams = of_type(examples, "ngram")
        grams = grams[grams["rank"] == 0]
        gram_ids = [tok.convert_tokens_to_ids(list(t)) for t in grams.tokens]
        rows.append(row("best corpus n-gram", corpus.best_ngram, t_ex, fluency_of_texts(fluency, gram_ids),
                        texts=" | ".join(grams.text.head(3))))
        rows.append(row("best corpus sentence", corpus.best_sentence, t_ex, math.nan))
        for method, overrides in (("continuous (embedding)", ["input=embedding"]),
                                  ("gumbel argmax", ["input=gumbel"]),
                                  ("PEZ (projected)", ["input=projected", "engine.keep=best"])):
            name = overrides[0].split("=", 1)[1]
            seconds = timed_run([*base, *overrides, f"trainer.max_steps={steps}"], d / name, ledger,
                                f"l{length}/{name}")
            df = read_targets(d / name).set_index("target_id")
            kind = input_kind(name)
            if kind.snaps_by_argmax:  # gumbel: its discrete readout is the argmax token of each position
                ids = [tok.convert_tokens_to_ids(list(t)) for t in df.snapped_tokens]
                rows.append(row(method, df.snapped_activation, seconds, fluency_of_texts(fluency, ids),
                                continuous=float(df.objective.mean())))
            elif kind.yields_tokens:  # PEZ: real tokens, the objective is theirs
                flu = fluency_of_texts(fluency, [list(i) for i in df.token_ids])
                rows.append(row(method, df.objective, seconds, flu, texts=" | ".join(df.text.head(3))))
            else:
                rows.append(row(method, df.objective, seconds, math.nan))
        if length == 1:
            maw = read_targets(d / "tokens").set_index("target_id").most_activating_word_activation
            rows.append(row("most activating word", maw, 0.0, math.nan))
        log.info("l=%d done", length)
    table = pd.DataFrame(rows)
    table["fluency_source"] = fluency.name
    return table


def table_row(length: int, corpus: pd.DataFrame, method: str, act: pd.Series, seconds: float, flu: float,
              **extra: object) -> dict:
    """One method at one length: its mean activation over the targets, the share that beat (are
    above, by more than 1e-6 relative) or reach (are at least, within it) the corpus's best."""
    act = act.reindex(corpus.index)
    ngram, sentence, n = corpus.best_ngram, corpus.best_sentence, len(corpus)

    def above(ref: pd.Series) -> float:
        return float((act > ref + 1e-6 * ref.abs()).mean())

    return {"length": length, "method": method, "targets": n, "mean_activation": float(act.mean()),
            "beats_ngram": above(ngram), "reaches_ngram": float((act >= ngram - 1e-6 * ngram.abs()).mean()),
            "beats_sentence": above(sentence), "fluency": flu, "seconds_per_target": seconds / n, **extra}


def markdown(table: pd.DataFrame) -> str:
    cols = ["length", "method", "mean_activation", "beats_ngram", "reaches_ngram", "beats_sentence", "fluency",
            "seconds_per_target"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table[cols].itertuples(index=False):
        cells = [f"{v:.3f}" if isinstance(v, float) and not math.isnan(v) else ("" if isinstance(v, float) else str(v))
                 for v in r]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from ft.cli.preflight import OneLineParser

    p = OneLineParser(prog="python -m ft.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="logs/compare", help="output folder (one run directory per length and method)")
    p.add_argument("--model", default=None, help="encoder (default: the packaged MiniLM)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 3, 5, 8])
    p.add_argument("--weights", type=float, nargs="+", default=[0, 0.05, 0.2], help="search.fluency_weights")
    p.add_argument("--targets", type=int, default=20, help="neurons (the default experiment's, spread evenly)")
    p.add_argument("--steps", type=int, default=200, help="steps of the continuous, gumbel and PEZ runs")
    p.add_argument("--search-steps", type=int, default=50, help="trainer.max_steps of the token search")
    p.add_argument("--candidates", type=int, default=48, help="search.candidates")
    p.add_argument("--patience", type=int, default=12, help="search.patience")
    a = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    out = Path(a.out)
    from ft.core.signals import handling

    try:
        with handling(stop):
            return compare_and_write(a, out)
    except FtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Stopped, Exception) as e:
        from ft.core.signals import Interrupted

        if not isinstance(e, (Stopped, Interrupted)):
            raise
        print(f"interrupted: {e}; resume with: python -m ft.compare {shlex.join(argv)}", file=sys.stderr)
        return 128 + e.signum


def stop(signum: int, _frame: object) -> None:
    raise Stopped(signum)


def compare_and_write(a: argparse.Namespace, out: Path) -> int:
    """The comparison and its files; a finished one (same arguments) is left as it is."""
    args = {k: v for k, v in vars(a).items() if k != "out"}
    ledger = Ledger(out, args)
    if ledger.done and (out / "comparison.parquet").exists():
        print(f"comparison already finished: {out}; nothing to do")
        return 0
    table = compare(out, a.lengths, a.weights, a.targets, a.steps, a.search_steps, a.candidates, a.patience,
                    a.model, ledger)
    from ft.cli.report import build_report
    from ft.cli.report import table as html_table
    from ft.core.files import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "comparison.parquet", lambda q: table.to_parquet(q, index=False))
    text = markdown(table)
    sizes = (f"{int(table.targets.iloc[0])} neurons; token search: candidates {a.candidates}, patience {a.patience}, "
             f"at most {a.search_steps} steps, fluency weights {a.weights}; continuous, gumbel, PEZ: {a.steps} steps; "
             f"total {ledger.total:.0f} s")
    atomic_write(out / "comparison.md", lambda q: q.write_text(text + "\n\n" + sizes + "\n"))
    cols = ["length", "method", "mean_activation", "beats_ngram", "reaches_ngram", "beats_sentence", "fluency",
            "seconds_per_target"]
    runs = [str(out / f"l{length}" / "tokens") for length in a.lengths]
    report = build_report(runs, out / "report.html",
                          extra=[("Comparison: optimized texts against the corpus",
                                  html_table(table[cols].to_dict("records"), cols, "comparison")
                                  + f"<p class='note'>{sizes}</p>")])
    ledger.done = True
    ledger.save()
    print(text)
    print(sizes)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
