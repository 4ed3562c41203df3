"""Does removing a concept's units matter? The ablation half of `ft.probe`.

For a set of units (the probe's top N by `rank_probe`, or `ablate.sites`) and, as the baseline,
N units drawn at random from the probed ones (`ablate.seeds` draws), each ablated (zero, or held
at its mean over the concept's words: `ft.model.ablate`):
- the probe's accuracy drop: the trained probe applied to the concept's held-out words, their
  activations read again with the units ablated (the standardization stays the unablated one);
- the masked-token accuracy drop, where a masked-LM head exists (the checkpoint's own head, or
  `ablate.mlm=DIR`): the share of masked corpus tokens predicted exactly, with the same masks
  with and without the ablation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ft.core.errors import ConfigError
from ft.model.ablate import MODES, ablated
from ft.model.sites import Site, SiteError

log = logging.getLogger("ft")
ABLATION = "ablation.parquet"


@dataclass
class MaskedTokens:
    """Corpus sentences with fixed masks: `ids` [n, S] ([CLS] ... [SEP], padded), `attention` [n, S],
    `masked` [n, S] bool (the positions replaced by [MASK]), `targets` [n, S] (the original ids)."""

    ids: torch.Tensor
    attention: torch.Tensor
    masked: torch.Tensor
    targets: torch.Tensor


def masked_tokens(sentences: Sequence[Sequence[int]], cls: int, sep: int, mask: int, pad: int, share: float = 0.15,
                  seed: int = 0) -> MaskedTokens:
    """Each sentence with round(share * length) (at least 1) of its tokens masked, seeded."""
    g = torch.Generator().manual_seed(seed)
    S = max(len(s) for s in sentences) + 2
    ids = torch.full((len(sentences), S), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    masked = torch.zeros_like(ids, dtype=torch.bool)
    for i, s in enumerate(sentences):
        ids[i, : len(s) + 2] = torch.tensor([cls, *s, sep])
        attention[i, : len(s) + 2] = 1
        n = max(1, round(share * len(s)))
        masked[i, 1 + torch.randperm(len(s), generator=g)[:n]] = True
    return MaskedTokens(ids.masked_fill(masked, mask), attention, masked, ids)


@torch.no_grad()
def masked_token_accuracy(mlm: torch.nn.Module, data: MaskedTokens, batch_size: int = 32) -> float:
    """The share of masked positions whose most likely token is the original one."""
    device = next(mlm.parameters()).device
    hits = total = 0
    for s in range(0, len(data.ids), batch_size):
        part = slice(s, s + batch_size)
        logits = mlm(input_ids=data.ids[part].to(device), attention_mask=data.attention[part].to(device)).logits
        m = data.masked[part].to(device)
        hits += int((logits.argmax(-1)[m] == data.targets[part].to(device)[m]).sum())
        total += int(m.sum())
    return hits / total


def ablation_sets(table: pd.DataFrame, cfg: object, model: torch.nn.Module) -> list[tuple[str, int, list[Site]]]:
    """[(set, seed, sites)]: the chosen units (`top` or `sites`), then `ablate.seeds` random draws
    of as many units from the probed ones, none of the chosen."""
    a = cfg.ablate
    if a.mode not in MODES:
        raise ConfigError(f"ablate.mode={a.mode!r}; valid: {list(MODES)}")
    seeds = int(a.seeds)
    if seeds < 0:
        raise ConfigError(f"ablate.seeds={a.seeds}; valid: an integer >= 0")
    if a.sites:
        try:
            chosen = [Site.parse(s).check(model) for s in a.sites]
        except SiteError as e:
            raise ConfigError(f"ablate.sites: {e}") from None
        name = "sites"
    else:
        n = int(a.top)
        if not 0 < n < len(table):
            raise ConfigError(f"ablate.top={a.top}; valid: 1..{len(table) - 1} (0 turns ablation off)")
        chosen = [Site.parse(s) for s in table.sort_values("rank_probe").site.head(n)]
        name = "top"
    pool = sorted(set(table.site) - {str(s) for s in chosen})
    if len(pool) < len(chosen):
        raise ConfigError(f"ablate: {len(chosen)} units chosen leave {len(pool)} probed units to draw the random "
                          "baseline from; valid: fewer units")
    out = [(name, -1, chosen)]
    for k in range(seeds):
        rng = np.random.default_rng(int(cfg.seed) * 1000 + k)
        out.append(("random", k, [Site.parse(pool[i]) for i in sorted(rng.choice(len(pool), len(chosen), False))]))
    return out


def ablation_table(sets: list[tuple[str, int, list[Site]]], model: torch.nn.Module, means: Callable,
                   probe_accuracy: Callable[[], float], mode: str, mlm: torch.nn.Module | None,
                   data: MaskedTokens | None) -> pd.DataFrame:
    """One row per ablated set: the probe's accuracy (and the masked-token accuracy) with it ablated.
    `means(sites)`: each site's mean activation (mode=mean); `probe_accuracy()`: read under the block."""
    base = probe_accuracy()
    mlm_base = masked_token_accuracy(mlm, data) if mlm is not None else float("nan")
    rows = []
    from ft.core.bars import bar

    for name, seed, sites in bar(sets, desc="ablation", unit="set"):
        values = means(sites) if mode == "mean" else None
        with ablated(model, sites, mode, values):
            acc = probe_accuracy()
        mlm_acc = float("nan")
        if mlm is not None:
            with ablated(mlm.base_model, sites, mode, values):
                mlm_acc = masked_token_accuracy(mlm, data)
        rows.append({"set": name, "seed": seed, "units": len(sites), "sites": " ".join(map(str, sites)),
                     "probe_accuracy": acc, "probe_drop": base - acc, "mlm_accuracy": mlm_acc,
                     "mlm_drop": mlm_base - mlm_acc})
    table = pd.DataFrame(rows)
    table.attrs.update(probe_base=base, mlm_base=mlm_base)
    return table


def ablation_summary(table: pd.DataFrame) -> dict[str, float]:
    """`ablate/*`: the chosen set's drops, and the random draws' mean and spread (std)."""
    chosen, rand = table[table.set != "random"].iloc[0], table[table.set == "random"]
    out = {"ablate/probe_base": float(table.attrs["probe_base"]), "ablate/probe_drop": float(chosen.probe_drop),
           "ablate/units": int(chosen.units)}
    if len(rand):
        out |= {"ablate/probe_drop_random_mean": float(rand.probe_drop.mean()),
                "ablate/probe_drop_random_std": float(rand.probe_drop.std(ddof=0))}
    if not np.isnan(table.attrs["mlm_base"]):
        out |= {"ablate/mlm_base": float(table.attrs["mlm_base"]), "ablate/mlm_drop": float(chosen.mlm_drop)}
        if len(rand):
            out |= {"ablate/mlm_drop_random_mean": float(rand.mlm_drop.mean()),
                    "ablate/mlm_drop_random_std": float(rand.mlm_drop.std(ddof=0))}
    return out


def find_mlm(spec: str | None, encoder: object, model_path: str, trust_remote_code: bool = False
             ) -> torch.nn.Module | None:
    """`ablate.mlm`: `auto` (the checkpoint's own masked-LM head, None without one), `none`, or a
    masked-LM directory whose encoder has the analysed model's layout."""
    from pathlib import Path

    from ft.measure.fluency import check_same_vocabulary, masked_lm_of
    from ft.model.encoder import resolve

    spec = str(spec or "auto")
    if spec == "none":
        return None
    head = getattr(encoder, "head", None)
    if spec == "auto":
        if head is not None and type(head).__name__.endswith("ForMaskedLM"):
            return head
        path = resolve(model_path)  # a local checkpoint's head; an in-memory model has none to load
        mlm = masked_lm_of(path, trust_remote_code) if Path(path).is_dir() else None
    else:
        if not Path(spec).is_dir():
            raise ConfigError(f"ablate.mlm={spec!r}: no such directory; valid: auto, none, or a masked-LM directory")
        check_same_vocabulary(spec, encoder.tokenizer, trust_remote_code, key="ablate.mlm")  # not scored by id alone
        mlm = masked_lm_of(spec, trust_remote_code)
        if mlm is None:
            raise ConfigError(f"ablate.mlm={spec!r} has no masked-LM head weights; valid: auto, none, or a "
                              "masked-LM checkpoint")
    if mlm is None:
        log.info("no masked-LM head for %s: the masked-token drop is not measured", model_path)
        return None
    return mlm.eval().to(encoder.word_embeddings.device)
