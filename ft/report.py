"""`python -m ft.report RUNS... [-o report.html]`: the paper's tables and figures, offline.

RUNS are run directories, folders above them (sweeps, shards) or globs. The page is one
self-contained HTML file: inline SVG figures, a few lines of inline JavaScript (sortable
tables, the comparison chart), no CDN. Sections whose data the runs lack say so.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ft.cli.report import DAMAGED, build_report, unwritable
from ft.core.signals import stops_in_one_line
from ft.rundir.results import (
    expand,
)


@stops_in_one_line("ft.report")
def main(argv: list[str] | None = None) -> int:
    from ft.cli.preflight import OneLineParser, PreflightError, refuse_in_run, refuse_inside

    p = OneLineParser(prog="python -m ft.report",
                      description="Tables and figures of the paper from ft run directories.")
    p.add_argument("runs", nargs="+", help="run directories, folders above them, or globs")
    p.add_argument("-o", "--out", default="report.html")
    p.add_argument("--words", type=int, default=3000, help="vocabulary sample in the PCA (0: none)")
    p.add_argument("--atlas-per-run", type=int, default=50)
    args = p.parse_args(argv)
    for flag, v in (("--words", args.words), ("--atlas-per-run", args.atlas_per_run)):
        if v < 0:
            print(f"error: {flag} {v}; valid: an integer >= 0 (0: none)", file=sys.stderr)
            return 2
    runs = expand(args.runs)
    if not runs:
        print(f"error: no run directories under {args.runs}", file=sys.stderr)
        return 2
    try:  # the page never replaces (or lands among) the files of a run it reads
        refuse_inside(Path(args.out), runs, "-o", "a file in a writable folder")
        refuse_in_run(Path(args.out), "-o", "a file in a writable folder")
    except PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = unwritable(Path(args.out))
    if problem:
        print(f"error: -o {args.out}: {problem}; valid: a file in a writable folder", file=sys.stderr)
        return 2
    from ft.core.chatter import configure_output

    configure_output("info")  # no weight-loading bars from transformers
    t = time.perf_counter()
    try:
        out = build_report(args.runs, args.out, args.words, args.atlas_per_run)
    except SystemExit as e:  # no run could be read: one line, the exit code of a bad input
        if not isinstance(e.code, str):
            raise
        print(e.code, file=sys.stderr)
        return 2
    for damaged in DAMAGED:
        print(f"warning: left out of the report: {damaged}", file=sys.stderr)
    print(f"report: {out} ({time.perf_counter() - t:.1f} s)")
    return 0


def __getattr__(name: str) -> object:  # a name that moved to another module still imports (ft.core.moved)
    from ft.core.moved import moved_attribute

    return moved_attribute(__name__, name)


if __name__ == "__main__":
    sys.exit(main())
