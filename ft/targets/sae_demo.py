"""A small demo SAE for whatever model a run has: trained with Lightning on corpus activations at one
site, saved in SAELens's layout (ft.targets.sae_file), cached by model, site and settings.

Standard ReLU SAE: f = relu((h - b_dec) W_enc + b_enc), h_hat = f W_dec + b_dec, loss = mean
squared error + l1 * sum_i f_i |W_dec[i]| (the decoder-norm-weighted L1, so rescaling the
decoder cannot buy sparsity). Reports explained variance (1 - SSE / total variance) and mean L0
on a held-out tenth of the tokens.

SIGTERM or SIGINT while the demo SAE is made raises `DemoInterrupted` (an `ft.core.signals.Interrupted`:
`ft.train` prints one line and exits 128 + signum): nothing is written before the SAE is trained,
and it is written to the cache as a whole directory (a temporary one renamed), or not at all.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ft.core.bars import bar
from ft.core.signals import HANDLED, Interrupted, handling
from ft.model.encoder import Encoder
from ft.model.sites import SiteReader
from ft.targets.sae_file import CFG, SAE, load_sae

log = logging.getLogger("ft")


@torch.no_grad()
def corpus_activations(encoder: Encoder, layer: int, point: str, corpus: str, max_tokens: int = 64,
                       batch_size: int = 64, limit: int = 100_000) -> torch.Tensor:
    """[tokens, width]: `point` of `layer` at every token of the corpus's sentences (no specials)."""
    return token_activations(encoder, point, [layer], corpus, max_tokens, batch_size, limit, desc="SAE activations")


@torch.no_grad()
def token_activations(encoder: Encoder, point: str, layers: list[int], corpus: str, max_tokens: int = 64,
                      batch_size: int = 64, limit: int = 100_000, desc: str = "activations") -> torch.Tensor:
    """[tokens, len(layers) * width]: `point` of each of `layers` at every token of the corpus's
    sentences, in context (the framing [CLS]/[SEP] left out), up to `limit` tokens."""
    from ft.data.corpus import load_corpus

    tok = encoder.tokenizer
    limit_tokens = type(encoder.arch).max_tokens(encoder.model.config)
    if limit_tokens is not None:  # the model's positions bound a sentence, with its two framing tokens
        max_tokens = min(max_tokens, limit_tokens - 2)
    text = load_corpus(corpus, tok, max_tokens)
    reader = SiteReader(encoder.model, [point], max(layers), slice(None))
    device = encoder.word_embeddings.device
    out, seen = [], 0
    for start in bar(range(0, len(text.ids), batch_size), desc=desc, unit="batch"):
        seqs = text.ids[start : start + batch_size]
        T = max(len(s) for s in seqs) + 2
        ids = torch.full((len(seqs), T), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, s in enumerate(seqs):
            ids[b, : len(s) + 2] = torch.tensor([tok.cls_token_id, *s, tok.sep_token_id])
            mask[b, : len(s) + 2] = 1
        acts = reader.read(input_ids=ids.to(device), attention_mask=mask.to(device))[point][:, layers]  # [B, L, T, W]
        keep = mask.bool().clone()
        keep[:, 0] = False
        keep[torch.arange(len(seqs)), mask.sum(1) - 1] = False  # the framing tokens are not text
        out.append(acts.transpose(1, 2).float().cpu()[keep].flatten(1))  # [kept, L * W]
        seen += int(keep.sum())
        if seen >= limit:
            break
    return torch.cat(out)[:limit]


class SAEModule(pl.LightningModule):
    """The SAE's parameters and its loss; Lightning runs the optimization."""

    def __init__(self, d_in: int, d_sae: int, l1: float, lr: float, b_dec: torch.Tensor, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W_dec = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=g), dim=1)
        self.W_dec = torch.nn.Parameter(W_dec)
        self.W_enc = torch.nn.Parameter(W_dec.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(b_dec.clone())
        self.l1, self.lr = l1, lr

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.b_dec) @ self.W_enc + self.b_enc).relu()

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (x,) = batch
        f = self.features(x)
        mse = (f @ self.W_dec + self.b_dec - x).pow(2).sum(-1).mean()
        sparsity = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        loss = mse + self.l1 * sparsity
        self.log_dict({"sae/mse": mse, "sae/l0": (f > 0).float().sum(-1).mean()}, prog_bar=True, on_step=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def sae(self) -> SAE:
        p = {n: t.detach().float().cpu().clone() for n, t in self.named_parameters()}
        return SAE(p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], "standard", True)


@torch.no_grad()
def quality(sae: SAE, x: torch.Tensor) -> dict[str, float]:
    """Explained variance and mean L0 of `sae` on activations x [tokens, d_in]."""
    f = sae.encode(x)
    sse = (sae.decode(f) - x).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return {"explained_variance": float(1 - sse / total), "l0": float((f > 0).float().sum(-1).mean())}


class DemoInterrupted(Interrupted):
    """A signal while the demo SAE was made. Nothing of it is kept unless `saved` (the signal came
    while it was being written, which finished first); the same command makes it again."""

    def __init__(self, signum: int, site: str, step: int, steps: int, folder: Path, saved: bool = False):
        super().__init__(signum, step, folder)
        what = (f"after the demo SAE for {site} was saved to {folder}" if saved else
                f"while training the demo SAE for {site} (step {step} of {steps}; nothing of it was saved)")
        self.args = (f"{signal.Signals(signum).name} {what}",)


class DemoSignals(pl.Callback):
    """SIGTERM/SIGINT while the demo SAE is made: DemoInterrupted at once (nothing is written until
    it is trained), or right after the write when one comes while the SAE is being written."""

    def __init__(self, site: str, steps: int, folder: Path):
        self.site, self.steps, self.folder = site, steps, folder
        self.step, self.pending, self.writing, self.raised = 0, None, False, False

    def handle(self, signum: int, _frame: Any) -> None:
        if self.raised:  # already stopping
            return
        if self.writing:
            self.pending = signum
            return
        self.raised = True
        raise DemoInterrupted(signum, self.site, self.step, self.steps, self.folder)

    @contextmanager
    def installed(self):
        """The handlers for the duration (only the main thread may set them)."""
        with handling(self.handle):
            yield self

    @contextmanager
    def writing_files(self):
        """A signal while the files are written waits for them, then stops the run."""
        self.writing = True
        try:
            yield
        finally:
            self.writing = False
        if self.pending is not None:
            self.raised = True
            raise DemoInterrupted(self.pending, self.site, self.step, self.steps, self.folder, saved=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning installs its own SIGTERM handler when the fit starts (it would end the fit
        quietly, and a half-trained SAE would be cached); ours goes back on top of it."""
        if threading.current_thread() is threading.main_thread():
            for s in HANDLED:
                signal.signal(s, self.handle)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.step = trainer.global_step


def save_whole(sae: SAE, folder: Path, extra: dict) -> None:
    """Write the SAE to a temporary sibling directory, then rename it to `folder` (replacing a
    damaged cache entry): `folder` holds a whole SAE or none."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        sae.save(tmp, extra)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def demo_sae(encoder: Encoder, layer: int, point: str, corpus: str = "packaged:lee", expansion: int = 4,
             l1: float = 0.1, steps: int = 1000, lr: float = 1e-3, seed: int = 0, use_cache: bool = True
             ) -> tuple[Path, dict[str, float]]:
    """Train (or take from the cache) the demo SAE; returns its directory and its quality.
    DemoInterrupted on SIGTERM/SIGINT, with nothing half-written."""
    from ft.core.files import cache_dir
    from ft.model.vocab import model_key

    site = f"layer.{layer}.{point}"
    name = (f"{model_key(encoder)}-{site}-x{expansion}-l1{l1:g}-s{steps}-lr{lr:g}-seed{seed}"
            f"-c{corpus_key(corpus)}")  # another corpus (or the same path with other text) is another SAE
    folder = cache_dir() / "sae" / name
    if use_cache and (folder / CFG).exists():
        try:
            load_sae(folder)
            stats = json.loads((folder / CFG).read_text())["ft_quality"]
            log.info("demo SAE for %s from the cache: %s", site, folder)
            return folder, stats
        except Exception as e:  # a damaged cache entry is rebuilt, never used
            log.warning("demo SAE cache %s unusable (%s); training again", folder, str(e)[:100])
    signals = DemoSignals(site, steps, folder)
    with signals.installed():
        t0 = time.perf_counter()
        x = corpus_activations(encoder, layer, point, corpus)
        sae, stats = train_demo(x, expansion, l1, steps, lr, seed, signals, site)
        stats["seconds"] = time.perf_counter() - t0
        with signals.writing_files():
            save_whole(sae, folder, {"hook_name": site, "model_name": encoder.name, "ft_corpus": corpus,
                                     "ft_quality": stats})
    log.info("demo SAE: explained variance %.3f, mean L0 %.1f (%.0f s)", stats["explained_variance"], stats["l0"],
             stats["seconds"])
    return folder, stats


def corpus_key(corpus: str) -> str:
    """Identifies a corpus spec by its content: the spec, and the fingerprint of the local file,
    folder or saved dataset it names (packaged:lee: the packaged file)."""
    import hashlib

    from ft.data.corpus import DEFAULT_CORPUS, packaged_lee_path
    from ft.rundir.kept import fingerprint

    h = hashlib.sha256(corpus.encode())
    path = packaged_lee_path() if corpus == DEFAULT_CORPUS else Path(corpus.removeprefix("hf:").split(":")[0]
                                                                     if corpus.startswith("hf:") else corpus)
    if path.exists():
        h.update(fingerprint(path).encode())
    return h.hexdigest()[:12]


def train_demo(x: torch.Tensor, expansion: int, l1: float, steps: int, lr: float, seed: int,
               signals: DemoSignals, site: str) -> tuple[SAE, dict[str, float]]:
    """The demo SAE trained on activations x [tokens, d_in] (a held-out tenth for its quality)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    held = max(1, len(x) // 10)
    test, train = x[order[:held]], x[order[held:]]
    scale = float(train.norm(dim=1).mean())  # trained on x / scale (unit mean norm), saved for x itself
    module = SAEModule(x.shape[1], expansion * x.shape[1], l1, lr, train.mean(0) / scale, seed)
    pl.seed_everything(seed, verbose=False)
    loader = DataLoader(TensorDataset(train / scale), batch_size=1024, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, max_epochs=-1, callbacks=[signals])
    log.info("training a demo SAE at %s: %d tokens, d_sae=%d, %d steps", site, len(train), expansion * x.shape[1],
             steps)
    trainer.fit(module, loader)
    sae = module.sae().rescaled(scale)
    return sae, {**quality(sae, test), "tokens": len(x)}
