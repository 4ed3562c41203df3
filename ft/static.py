"""Static readings of units: what a unit's weights say about the vocabulary, with no forward pass
(Geva et al. 2022; Dar et al. 2023).

E is the word-embedding matrix in the hidden space (`to_hidden`: through the embedding
projection where the embedding size differs from the hidden size), special tokens left out.
- An FFN neuron (`ffn_act` unit j of layer L): v = column j of the FFN output projection, k =
  row j of its input projection (the input half for gated FFNs). `static_promotes` /
  `static_suppresses`: the tokens with the largest / smallest E . v (what the neuron writes);
  `static_detects`: the largest E . k (what it reads).
- A hidden-width unit (`ffn_out`, `attn_out`, `resid` dimension d): `static_promotes` /
  `static_suppresses` from column d of E; no `static_detects`.
- `attn_ctx` units (a head's context dimension) have no static reading.

`python -m ft.static [--model M] [--points ffn_act ffn_out] [--top 10] --out FILE.parquet` reads
every unit of those points of a model: one matrix product per layer and point.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ft.core.errors import ConfigError, FtError
from ft.core.signals import stops_in_one_line
from ft.model.static import TOP, all_units, check_points


@stops_in_one_line("ft.static")
def main(argv: list[str] | None = None) -> int:
    from ft.cli.preflight import OneLineParser, refuse_in_run, refuse_inside, writable_place
    from ft.core.files import atomic_write
    from ft.core.integrity import StorageError
    from ft.model.encoder import PACKAGED, load_encoder
    from ft.model.vocab import Vocabulary

    p = OneLineParser(prog="python -m ft.static", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=PACKAGED, help=f"encoder: {PACKAGED} (default) or a local model directory")
    p.add_argument("--points", nargs="+", default=["ffn_act", "ffn_out"])
    p.add_argument("--top", type=int, default=TOP, help="tokens per reading")
    p.add_argument("--out", required=True, help="parquet file to write")
    a = p.parse_args(argv)
    from ft.core.chatter import configure_output

    configure_output("info")  # no weight-loading bars from transformers
    try:
        if a.top < 1:
            raise ConfigError(f"--top={a.top}; valid: an integer >= 1")
        check_points(a.points)
        out = Path(a.out)
        writable_place(out, "--out", "a parquet file in a writable folder", folder=False)  # before the work
        if Path(a.model).is_dir():  # never over the weights (or beside them) of the model it reads
            refuse_inside(out, [Path(a.model)], "--out", "a parquet file")
        refuse_in_run(out, "--out", "a parquet file")  # nor among a run's files
        start = time.perf_counter()
        enc = load_encoder(a.model)
        df = all_units(enc.model, Vocabulary.from_tokenizer(enc.tokenizer), a.points, a.top)
        atomic_write(out, lambda q: df.to_parquet(q, index=False))
    except FtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk filled while writing: one line, nothing half-written
        print(f"error: {e if isinstance(e, StorageError) else f'{out}: {e.strerror or e}'}", file=sys.stderr)
        return 1
    counts = df.groupby("point").size().to_dict()
    print(f"{len(df)} units ({counts}) read in {time.perf_counter() - start:.1f} s -> {out}")
    return 0


def __getattr__(name: str) -> object:  # a name that moved to another module still imports (ft.core.moved)
    from ft.core.moved import moved_attribute

    return moved_attribute(__name__, name)


if __name__ == "__main__":
    sys.exit(main())
