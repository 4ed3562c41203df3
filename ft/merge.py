"""`python -m ft.merge RUNS... -o DIR`: the shards of one run (`target.shard=i target.num_shards=N`,
e.g. a Slurm job array through `hydra/launcher=slurm`) joined into one run directory.

The merged directory has what an unsharded run writes: `targets.parquet` (rows in target order),
`inputs.safetensors`, `curves.parquet`, `frontier.parquet` when the shards have one, `config.yaml`
(the shards' config with `target.shard=0`, `target.num_shards=1`, and `merged_from`) and
`summary.json`, recomputed from the merged targets (`ft.measure.metrics.summarize`; run-level keys the
shards agree on are kept). Rows are independent wherever a row's trajectory depends only on
itself: a fixed step count, or `engine.freeze_converged=true`. Then the merge equals the
unsharded run. A run that stops as a whole (every row converged) may stop its shards at
different steps.

The shards must be the same run: every config key but `target.shard` (and run_name, ckpt_path,
log_level) equal. A missing shard is named with the command that completes it; a shard that did
not finish is named by its directory (running its command again resumes it). The input files
the shards kept (`kept/`: an SAE, a directions file, a concept file, the model's fingerprint) are
kept once in the merged run; shards that read different contents are refused.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf, open_dict

from ft.core.errors import ConfigError, FtError
from ft.core.integrity import StorageError
from ft.core.signals import stops_in_one_line
from ft.rundir.results import (
    CONFIG,
    TARGETS,
    expand,
    read_config,
    read_curves,
    read_directions,
    read_frontier,
    read_inputs,
    read_summary,
    read_targets,
    write_run,
)
from ft.rundir.tracking import flat_config

log = logging.getLogger("ft")
FREE_KEYS = ("target.shard", "run_name", "ckpt_path", "log_level", "merged_from")


class ShardError(ConfigError):
    """The shards do not make a whole run: one is missing, unfinished, or from another run."""


def collect(dirs: list[Path]) -> list[Path]:
    """The shard directories in shard order; ShardError naming what is missing or unfinished."""
    if not dirs:
        raise ShardError("no run directories given; valid: the shards' run directories or the folder above them")
    configs = {d: read_config(d) for d in dirs}
    ref_dir = dirs[0]
    ref = {k: v for k, v in flat_config(configs[ref_dir]).items() if k not in FREE_KEYS}
    n = int(ref.get("target.num_shards", 1))
    by_shard: dict[int, Path] = {}
    for d, cfg in configs.items():
        flat = {k: v for k, v in flat_config(cfg).items() if k not in FREE_KEYS}
        diff = sorted(k for k in set(flat) | set(ref) if flat.get(k) != ref.get(k))
        if diff:
            k = diff[0]
            raise ShardError(f"{d} is not a shard of the same run as {ref_dir}: {k}={flat.get(k)!r} there, "
                             f"{ref.get(k)!r} here; valid: shards that differ only in target.shard")
        shard = int(cfg.target.get("shard", 0))
        if shard in by_shard:
            raise ShardError(f"shard {shard} appears twice: {by_shard[shard]} and {d}; valid: one directory per shard")
        by_shard[shard] = d
    missing = [i for i in range(n) if i not in by_shard]
    if missing:
        raise ShardError(f"shard {missing[0]} of {n} is missing ({len(missing)} missing: {missing}); run it with "
                         f"target.shard={missing[0]} target.num_shards={n} and the shards' other settings")
    unfinished = [by_shard[i] for i in range(n) if not (by_shard[i] / TARGETS).exists()]
    if unfinished:
        raise ShardError(f"shard {int(configs[unfinished[0]].target.shard)} did not finish: {unfinished[0]} has no "
                         f"results; run its command again with hydra.run.dir={unfinished[0]} (it resumes)")
    return [by_shard[i] for i in range(n)]


def merged_summary(df: pd.DataFrame, summaries: list[dict]) -> dict[str, float]:
    """The aggregates of the merged targets, as a run computes them, and the run-level keys every
    shard agrees on (e.g. the word vectors' mean norm, a demo SAE's quality)."""
    from ft.measure.metrics import summarize

    out = summarize(df)
    if "static_promotes" in df:
        from ft.model.static import agreement

        out["final/static_maw_agreement"] = agreement(df)
    if "fluency" in df:
        out["final/fluency_mean"] = float(df["fluency"].mean())
    for column, key in (("concept_closest_share", "probe/closest_in_concept"), ("concept_maw", "probe/maw_in_concept"),
                        ("concept_text_share", "probe/text_in_concept")):
        if column in df:
            out[key] = float(df[column].astype(float).mean())
    dropped = []
    for key in summaries[0]:
        if key in out:
            continue
        values = [s.get(key) for s in summaries]
        if all(v == values[0] for v in values):
            out[key] = values[0]
        else:
            dropped.append(key)
    if dropped:
        log.info("summary keys that differ between shards and are not recomputed: %s", ", ".join(dropped))
    return out


def check_out(dirs: list[Path], out: Path) -> None:
    """`-o` is a new or empty folder that can be written, and holds none of the shards."""
    from ft.cli.preflight import writable_place

    out = Path(out)
    if (out / TARGETS).exists() or (out / CONFIG).exists():
        raise ShardError(f"-o {out} already holds a run; valid: a new or empty folder")
    inside = [d for d in dirs if Path(d).resolve().is_relative_to(out.resolve())]
    if inside:
        raise ShardError(f"-o {out} holds the shard {inside[0]}: the merge would hide the shards among its files; "
                         "valid: a new or empty folder outside the shards")
    within = [d for d in dirs if out.resolve().is_relative_to(Path(d).resolve())]
    if within:
        raise ShardError(f"-o {out} is inside the shard {within[0]}: the merged run would be read as part of it; "
                         "valid: a new or empty folder outside the shards")
    if out.is_dir() and any(out.iterdir()):
        raise ShardError(f"-o {out} is not empty ({next(out.iterdir()).name}, ...); valid: a new or empty folder")
    writable_place(out, "-o", "a new or empty folder where you can write", folder=True)


def keep_shard_inputs(shards: list[Path], out: Path) -> None:
    """The inputs the shards kept (`ft.rundir.kept`: SAE, directions, concept, the model's fingerprint),
    kept once in the merged run. Shards that read different contents are not one run."""
    from ft.rundir.kept import index, keep, kept

    first = index(shards[0])
    for d in shards[1:]:
        other = index(d)
        for role in sorted(set(first) | set(other)):
            a, b = first.get(role, {}).get("sha256"), other.get(role, {}).get("sha256")
            if a != b:
                raise ShardError(f"{d} read another {role} than {shards[0]} (sha256 {str(b)[:12]} != {str(a)[:12]}); "
                                 "valid: shards of one run, made from the same input files")
    for role, entry in first.items():
        path = kept(shards[0], role)  # verified against its record (RunFileError when altered)
        if path is not None:
            keep(out, role, path, digest=entry["sha256"])


def merge(dirs: list[Path], out: Path) -> Path:
    """Join the shards `dirs` (any order) into the run directory `out`."""
    check_out(dirs, out)
    shards = collect(dirs)
    tables, tensors, curves, frontiers = [], [], [], []
    for d in shards:
        t = read_targets(d).reset_index(drop=True)
        x = read_inputs(d)
        tables.append(t)
        tensors.append(x)
        c = read_curves(d)
        if c is not None:
            curves.append(c)
        f = read_frontier(d)
        if f is not None:
            frontiers.append(f)
    df = pd.concat(tables, ignore_index=True)
    order = torch.as_tensor(df.sort_values(["target_id", "restart"] if "restart" in df else "target_id",
                                           kind="stable").index.to_numpy())
    df = df.iloc[order.numpy()].reset_index(drop=True)
    keys = set(tensors[0])
    if any(set(x) != keys for x in tensors):
        raise ShardError("the shards' inputs.safetensors hold different tensors; valid: shards of one run")
    merged = {k: torch.cat([x[k] for x in tensors])[order].contiguous() for k in sorted(keys)}
    cfg = read_config(shards[0])
    with open_dict(cfg):
        cfg.target.shard, cfg.target.num_shards = 0, 1
        cfg.merged_from = [str(d) for d in shards]
    summary = merged_summary(df, [read_summary(d) for d in shards])
    curve = pd.concat(curves, ignore_index=True).sort_values(["step", "target_id"]) if curves else None
    frontier = pd.concat(frontiers, ignore_index=True) if frontiers else None
    directions = read_directions(shards[0])
    from ft.cli.export_files import staging

    with staging(out) as tmp:  # written beside `out` and moved into place: a stop or a full disk leaves no part
        keep_shard_inputs(shards, tmp)
        write_run(tmp, OmegaConf.create(OmegaConf.to_container(cfg)), df, merged, summary, curve, directions,
                  frontier)
    return out


@stops_in_one_line("ft.merge")
def main(argv: list[str] | None = None) -> int:
    from ft.cli.preflight import OneLineParser

    p = OneLineParser(prog="python -m ft.merge", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="the shards' run directories, or the folder above them (a multirun)")
    p.add_argument("-o", "--out", required=True, help="the merged run directory (new or empty)")
    a = p.parse_args(argv)
    from ft.core.chatter import configure_output

    configure_output("info")
    try:
        out = merge(expand(a.runs), Path(a.out))
    except FtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk filled while writing: one line (write_run leaves no half-written file)
        print(f"error: {e if isinstance(e, StorageError) else f'{a.out}: {e.strerror or e}'}", file=sys.stderr)
        return 1
    print(f"merged {read_config(out).merged_from.__len__()} shards: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
