"""SAE latents: one target per latent of an SAE (SAELens's saved layout, `target.path`) read at a
site `layer.L.point`, or of the demo SAE ft trains for the model (`target.path=null`); the objective
is the latent's pre-activation."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from omegaconf import DictConfig

from ft.core.errors import ConfigError, TargetError
from ft.core.typed import Int, Num, Unique
from ft.model.encoder import Encoder
from ft.model.sites import SiteError, parse_point, point_width
from ft.rundir.kept import fingerprint
from ft.targets.base import Target, refuse_empty
from ft.targets.objectives import Objective
from ft.targets.registry import BuildContext, RebuildContext, SummaryContext, UnitKind, register
from ft.targets.sae_file import CFG, SAE, load_sae


def check_sae_fits(sae: SAE, model: torch.nn.Module, point: str) -> None:
    width = point_width(model, point)
    if sae.d_in != width:
        raise TargetError(f"target.path={sae.source!r}: the SAE reads d_in={sae.d_in}, {point} is {width} wide in this "
                          f"model; valid: an SAE trained on {point} of this model")


def sae_targets(model: torch.nn.Module, sae: SAE, site: str, latents: Sequence[int] | None = None,
                fraction: float | None = None, num_latents: int | None = None, seed: int = 0) -> list[Target]:
    """One target per SAE latent: its pre-activation at `site` (`layer.L.point`). `latents`, or a
    seeded sample: `fraction` of them, else `num_latents`."""
    try:
        layer, point = parse_point(site, model)
    except SiteError as e:
        raise TargetError(f"target.site: {e}") from None
    check_sae_fits(sae, model, point)
    refuse_empty("target.latents", latents)
    if latents is not None:
        bad = [i for i in latents if not 0 <= int(i) < sae.d_sae]
        if bad:
            raise TargetError(f"target.latents: {bad[0]} out of range; valid 0..{sae.d_sae - 1}")
        chosen = [int(i) for i in latents]
    else:
        n = max(1, round(fraction * sae.d_sae)) if fraction else int(num_latents or 1)
        if not 0 < n <= sae.d_sae:
            raise TargetError(f"target.num_latents={n}; valid 1..{sae.d_sae}")
        chosen = sorted(random.Random(seed).sample(range(sae.d_sae), n))
    return [Target("sae", sae.readout(layer, point, i), spec=f"layer.{layer}.{point}", latent=i, sae_path=sae.source,
                   meta={"sae": sae, "layer": layer, "point": point}) for i in chosen]


def build_sae_targets(cfg: DictConfig, encoder: Encoder, resumed_sae: dict | None = None) -> list[Target]:
    """target=sae: the SAE at target.path, or the demo SAE trained for this model (target.path=null).

    `resumed_sae` (a resume of a demo-SAE run): {"copy": the run's kept copy (verified) or None,
    "sha256": the fingerprint the checkpoint's run recorded}. The kept copy is read rather than the
    cache; a demo SAE of other content than the one the earlier steps used is refused."""

    from ft.model.sites import parse_point
    from ft.targets.sae_demo import demo_sae
    from ft.targets.sae_file import load_sae

    t = cfg.target
    site = t.site or f"layer.{encoder.num_layers // 2}.resid"
    quality = None
    resumed_sae = resumed_sae or {}
    if t.path:
        sae = load_sae(t.path)
    elif resumed_sae.get("copy") is not None:  # this run's own demo SAE, not the cache's (changed since?)
        sae = load_sae(resumed_sae["copy"])
        sae.source = resumed_sae.get("source") or sae.source  # named as the run first read it (sae_path)
        quality = json.loads((Path(resumed_sae["copy"]) / CFG).read_text()).get("ft_quality")
    else:
        layer, point = parse_point(site, encoder.model)
        d = t.demo
        folder, quality = demo_sae(encoder, layer, point, corpus=d.corpus, expansion=d.expansion, l1=d.l1,
                                   steps=d.steps, lr=d.lr, seed=cfg.seed, use_cache=cfg.cache)
        sae = load_sae(folder)
        want = resumed_sae.get("sha256")
        if want and fingerprint(folder) != want:
            raise ConfigError(f"cannot resume: the demo SAE {folder} is not the one the checkpoint's run started with "
                              f"(sha256 {fingerprint(folder)[:12]}, it used {want[:12]}); valid: a new run directory "
                              "(hydra.run.dir=...), or ckpt_path=none to start over")
    targets = sae_targets(encoder.model, sae, site, t.latents, t.fraction, t.num_latents, t.seed)
    for target in targets:
        target.meta["sae_quality"] = quality
        target.meta["sae_kept"] = resumed_sae.get("copy") is not None  # already the run's kept copy
    return targets


@dataclass
class SaeDemoSchema:
    """configs/target/sae.yaml `demo`: the demo SAE trained when target.path is null."""

    expansion: Int(ge=1)
    l1: Num(ge=0)
    steps: Int(ge=1)
    lr: Num(gt=0)
    corpus: str


@register
class SaeKind(UnitKind):
    name = "sae"
    option = "sae"
    summary_line = "SAE latents at layer.L.point: a SAELens folder (target.path) or the demo SAE trained here"
    keys = {"path": str | None, "site": str | Annotated[list[str], Unique] | None,
            "latents": Annotated[list[Int(ge=0)], Unique] | None, "fraction": Num(gt=0, le=1) | None,
            "num_latents": Int(ge=1) | None, "demo": dict | None}
    nodes = {"demo": SaeDemoSchema}

    def check(self, t: dict) -> None:
        if t.get("site"):
            parse_point(t["site"])
        if t.get("path"):
            load_sae(t["path"])

    def check_model(self, t: dict, model: torch.nn.Module) -> None:
        for text in [t["site"]] if isinstance(t.get("site"), str) else t.get("site") or []:
            parse_point(text, model)

    made_inputs = ("sae",)  # the demo SAE (target.path=null) is kept in the run like a given one

    def sources(self, t: Any) -> dict[str, Path]:
        return {"sae": Path(str(t.path))} if t.get("path") else {}

    def made(self, targets: list[Target]) -> dict[str, Path]:
        sae = targets[0].meta.get("sae") if targets else None
        if sae is None or targets[0].meta.get("sae_kept"):  # none, or already the run's own kept copy
            return {}
        return {"sae": Path(sae.source)}

    def build(self, ctx: BuildContext) -> list[Target]:
        return build_sae_targets(ctx.cfg, ctx.encoder, ctx.resumed)

    def rebuild(self, row: Any, ctx: RebuildContext) -> Objective:
        """The run's kept SAE (`ft.rundir.kept`, verified) when it has one; only runs from before ft
        kept inputs re-read `sae_path`. One SAE is read once per table."""
        from ft.rundir.kept import kept

        key = ("sae", row.sae_path)
        if key not in ctx.cache:
            copy = kept(ctx.run_dir, "sae") if ctx.run_dir is not None else None
            ctx.cache[key] = load_sae(copy or row.sae_path)
        sae = ctx.cache[key]
        layer, point = parse_point(row.sites[0], ctx.model)
        check_sae_fits(sae, ctx.model, point)
        return sae.readout(layer, point, int(row.latent))

    def label(self, t: Target) -> str:
        return f"{t.spec}:sae.{t.latent}"

    def summary(self, ctx: SummaryContext) -> dict[str, float]:
        quality = ctx.targets[0].meta.get("sae_quality") if ctx.targets else None
        return {f"sae/{k}": float(v) for k, v in (quality or {}).items()}  # the demo SAE's own quality
