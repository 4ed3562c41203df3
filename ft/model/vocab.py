"""The vocabulary: which items count as words, the vocabulary sweep (cached), analysis vectors.

The sweep passes every vocabulary item alone as ``[CLS] w [SEP]`` and records the
activations of every neuron of one point, in every layer, at the word's position.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ft.core.bars import bar
from ft.core.files import cache_dir
from ft.core.integrity import remove_stale_temps, save_tensors, sha256_bytes, temp_name
from ft.model.arch import adapter
from ft.model.encoder import Encoder
from ft.model.fastforward import FastSiteReader, supports
from ft.model.sites import SiteReader, num_layers

log = logging.getLogger(__name__)


@dataclass
class Vocabulary:
    """Vocabulary items that count as words: all of them minus the special tokens."""

    ids: torch.Tensor  # [V'] token ids, ascending
    tokens: list[str]  # [V'] token strings
    cls_id: int
    sep_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer: object) -> Vocabulary:
        vocab: dict[str, int] = tokenizer.get_vocab()
        special = set(tokenizer.all_special_ids)
        pairs = sorted((i, t) for t, i in vocab.items() if i not in special)
        return cls(
            ids=torch.tensor([i for i, _ in pairs], dtype=torch.long),
            tokens=[t for _, t in pairs],
            cls_id=int(tokenizer.cls_token_id),
            sep_id=int(tokenizer.sep_token_id),
        )

    def __len__(self) -> int:
        return len(self.tokens)

    def row_of(self) -> dict[str, int]:
        """token string -> row in this vocabulary (not the token id)."""
        return {t: r for r, t in enumerate(self.tokens)}


def model_key(encoder: Encoder) -> str:
    """Identifies the weights (every parameter and buffer), the config and the tokenizer's
    vocabulary, so a cache never serves another model's activations."""
    h = hashlib.sha256(encoder.model.config.to_json_string().encode())
    for name, t in sorted(encoder.model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    tok = encoder.tokenizer
    h.update(repr(sorted(tok.get_vocab().items())).encode())
    h.update(repr((sorted(tok.all_special_tokens), getattr(tok, "do_lower_case", None), type(tok).__name__)).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def sweep_vocabulary(
    encoder: Encoder, vocab: Vocabulary, point: str, position: int = 1, batch_size: int = 1024
) -> torch.Tensor:
    """Activations [V', layers, width] of `point` at `position` for every `[CLS] w [SEP]`."""
    model = encoder.model
    # the lean forward, where the model allows it: same values, a fraction of the work
    reader = (FastSiteReader if supports(model) else SiteReader)(model, [point], num_layers(model) - 1, position)
    device = encoder.word_embeddings.device
    out: torch.Tensor | None = None  # filled in place: no second copy of a ~1 GB sweep (bert-base)
    for start in bar(range(0, len(vocab), batch_size), desc=f"vocabulary sweep ({point})"):
        ids = vocab.ids[start : start + batch_size]
        n = len(ids)
        input_ids = torch.stack(
            [torch.full((n,), vocab.cls_id), ids, torch.full((n,), vocab.sep_id)], dim=1
        ).to(device)
        acts = reader.read(input_ids=input_ids)[point].float().cpu()
        if out is None:
            out = torch.empty((len(vocab), *acts.shape[1:]))
        out[start : start + n] = acts
    assert out is not None, "empty vocabulary"
    return out


def load_or_sweep(
    encoder: Encoder, vocab: Vocabulary, point: str, position: int = 1, use_cache: bool = True
) -> torch.Tensor:
    """The sweep from the on-disk cache (keyed by model, point, position), computed if absent.

    The cache is only ever a speed-up: a damaged file (its sha256 is in the file's metadata) is
    rebuilt with a warning, and a cache folder that cannot be written (read-only, full) is a
    warning, never an error. A write killed midway leaves a temporary file that the next
    write to the folder removes.
    """
    from ft.model.ablate import active

    use_cache = use_cache and active(encoder.model) is None  # an ablated model's sweep is not the model's
    folder = cache_dir() / "vocab_sweep"
    path = folder / f"{model_key(encoder)}_{point}_p{position}.safetensors"
    expected = (len(vocab), num_layers(encoder.model))
    if use_cache and path.exists():
        acts = read_cached(path, expected)
        if acts is not None:
            return acts
    acts = sweep_vocabulary(encoder, vocab, point, position)
    if use_cache:
        write_cached(path, acts)
    return acts


def read_cached(path: Path, expected: tuple[int, int]) -> torch.Tensor | None:
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        acts = load_file(str(path))["acts"]
    except (SafetensorError, KeyError, OSError, RuntimeError, ValueError) as e:
        log.warning("vocabulary sweep cache %s is unreadable (%s); rebuilding", path, e)
        return None
    if tuple(acts.shape[:2]) != expected:
        log.warning("vocabulary sweep cache %s has the wrong shape; rebuilding", path)
        return None
    want = meta.get("sha256")
    if want is None:
        log.warning("vocabulary sweep cache %s has no checksum (written by an older ft): used unverified; "
                    "delete it to rebuild", path)
    elif sha256_bytes(acts.contiguous().view(-1).view(torch.uint8).numpy()) != want:
        log.warning("vocabulary sweep cache %s is damaged (sha256 of its data does not match); rebuilding", path)
        return None
    return acts


def write_cached(path: Path, acts: torch.Tensor) -> None:
    acts = acts.contiguous()
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent)
        digest = sha256_bytes(acts.view(-1).view(torch.uint8).numpy())
        save_tensors({"acts": acts}, tmp, metadata={"sha256": digest})
        os.replace(tmp, path)
    except OSError as e:
        log.warning("vocabulary sweep not cached: cannot write %s (%s); the run goes on without the cache",
                    path, e.strerror or e)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


@torch.no_grad()
def analysis_vectors(
    encoder: Encoder, vocab: Vocabulary, position: int = 1, batch_size: int = 4096
) -> torch.Tensor:
    """Every word through the embeddings module at `position` (the analysis space): [V', embedding size]."""
    a = adapter(encoder.model)
    device = encoder.word_embeddings.device
    out = []
    for start in range(0, len(vocab), batch_size):
        ids = vocab.ids[start : start + batch_size]
        seq = torch.full((len(ids), position + 1), vocab.cls_id)
        seq[:, position] = ids
        out.append(a.embed(input_ids=seq.to(device))[:, position].float().cpu())
    return torch.cat(out)


# -- streaming: vocabularies whose full table does not fit (XLM-R: 250,002 tokens) --------------------
def sweep_bytes(encoder: Encoder, vocab: Vocabulary, point: str) -> int:
    """Size of the full vocabulary table of `point`: [V', layers, width] float32."""
    from ft.model.sites import point_width

    return 4 * len(vocab) * num_layers(encoder.model) * point_width(encoder.model, point)


def stream_vocabulary(encoder: Encoder, vocab: Vocabulary, points: Sequence[str], position: int, batch_size: int
            ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(first row, {point: [batch, layers, width]}) over the vocabulary, a batch at a time."""
    model = encoder.model
    reader = (FastSiteReader if supports(model) else SiteReader)(model, points, num_layers(model) - 1, position)
    device = encoder.word_embeddings.device
    with torch.no_grad():
        for start in bar(range(0, len(vocab), batch_size), desc=f"vocabulary stream ({', '.join(points)})"):
            ids = vocab.ids[start : start + batch_size]
            n = len(ids)
            input_ids = torch.stack([torch.full((n,), vocab.cls_id), ids, torch.full((n,), vocab.sep_id)], 1)
            yield start, {p: a.float().cpu() for p, a in reader.read(input_ids=input_ids.to(device)).items()}


@dataclass
class SweepSummary:
    """What group selection needs of a point's sweep, without the table: each neuron's maximum
    over the vocabulary and the target words' rows."""

    a_max: torch.Tensor  # [layers * width]
    rows: dict[int, torch.Tensor]  # vocabulary row -> [layers * width]
    layers: int
    width: int

    @classmethod
    def of(cls, sweep: torch.Tensor, rows: Sequence[int]) -> SweepSummary:
        flat = sweep.flatten(1)
        return cls(flat.max(dim=0).values, {r: flat[r] for r in rows}, sweep.shape[1], sweep.shape[2])


def stream_summary(encoder: Encoder, vocab: Vocabulary, point: str, rows: Sequence[int], position: int = 1,
                   batch_size: int = 1024) -> SweepSummary:
    """`SweepSummary.of(sweep)` in one pass over the vocabulary, never holding the table."""
    a_max: torch.Tensor | None = None
    keep: dict[int, torch.Tensor] = {}
    wanted = set(rows)
    for start, acts in stream_vocabulary(encoder, vocab, [point], position, batch_size):
        flat = acts[point].flatten(1)
        top = flat.max(dim=0).values
        a_max = top if a_max is None else torch.maximum(a_max, top)
        for r in wanted & set(range(start, start + len(flat))):
            keep[r] = flat[r - start].clone()
    shape = acts[point].shape
    return SweepSummary(a_max, keep, shape[1], shape[2])


def __getattr__(name: str) -> object:  # a name that moved to another module still imports (ft.core.moved)
    from ft.core.moved import moved_attribute

    return moved_attribute(__name__, name)
