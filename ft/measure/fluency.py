"""How fluent a token sequence is: a score per sequence, and each single swap's change of it.

A `Fluency` scores `[CLS] t_1 .. t_l [SEP]` (the search's frame) in nats per token (<= 0; higher is
more fluent) and, for the search's proposals, gives for every position i and vocabulary item v
the change of that score when t_i becomes v.

- `BigramPrior` (no network, no masked-LM head needed; the packaged MiniLM has none): word-piece
  bigrams of a corpus (default: the packaged Lee corpus), each sentence framed by CLS and SEP.
  p(b | a) = lam * c(a, b) / c(a) + (1 - lam) * p_uni(b), with p_uni(b) = (c(b) + 1) / (N + V)
  (add-one unigrams; lam = 0.5, and p = p_uni where a was never seen). The score is the mean of
  log p(t_i | t_(i-1)) over the l + 1 transitions from CLS to SEP. Its swap changes are exact.
- `MaskedLMFluency`: the pseudo-log-likelihood of a masked LM of the same vocabulary (the analysed
  model's own head, or `search.fluency_model`): the mean over i of log p(t_i | the rest, t_i
  masked). A swap's change counts the swapped position's own term exactly (one masked forward per
  position gives it for every v); the other terms' change is left out of the proposal ranking,
  and every candidate is then scored exactly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ft.core.errors import ConfigError
from ft.model.encoder import TOKENIZER_FILES, check_weights_file

log = logging.getLogger("ft")
LAMBDA = 0.5


class BigramPrior:
    """Interpolated word-piece bigram model of a corpus (see the module docstring)."""

    def __init__(self, sentences: Sequence[Sequence[int]], vocab_size: int, cls_id: int, sep_id: int,
                 source: str = "corpus", lam: float = LAMBDA):
        V = int(vocab_size)
        pairs = []
        for s in sentences:
            seq = [cls_id, *s, sep_id]
            pairs.extend(a * V + b for a, b in zip(seq[:-1], seq[1:], strict=True))
        if not pairs:
            raise ConfigError(f"fluency prior: the corpus {source!r} has no sentences")
        keys, counts = torch.tensor(pairs, dtype=torch.long).unique(return_counts=True)
        a, b = keys // V, keys % V
        c = counts.double()
        self.V, self.lam, self.cls_id, self.sep_id = V, float(lam), cls_id, sep_id
        self.name = f"bigram:{source}"
        self.unigram = torch.zeros(V, dtype=torch.float64).index_add_(0, b, c)  # c(b), as a next token
        self.context = torch.zeros(V, dtype=torch.float64).index_add_(0, a, c)  # c(a), as a context
        self.p_uni = (self.unigram + 1) / (self.unigram.sum() + V)  # [V]
        w = self.lam * c / self.context[a]  # the bigram part of p(b | a)
        self.rows = torch.sparse_coo_tensor(torch.stack([a, b]), w, (V, V)).coalesce()  # [a, b]
        self.cols = torch.sparse_coo_tensor(torch.stack([b, a]), w, (V, V)).coalesce()  # [b, a]

    def mix(self, a: torch.Tensor) -> torch.Tensor:
        """[n] weight of the unigram part after context `a` (1 where `a` was never a context)."""
        return torch.where(self.context[a] > 0, 1 - self.lam, 1.0)

    def logp(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """log p(b | a) for matching [..] long tensors."""
        a_, b_ = a.reshape(-1).cpu(), b.reshape(-1).cpu()
        keys = self.rows.indices()[0] * self.V + self.rows.indices()[1]  # sorted (coalesced)
        q = a_ * self.V + b_
        at = torch.searchsorted(keys, q).clamp_max(len(keys) - 1)
        big = torch.where(keys[at] == q, self.rows.values()[at], 0.0)
        p = big + self.mix(a_) * self.p_uni[b_]
        return p.log().float().view(a.shape).to(a.device)

    def framed(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[0]
        cls = torch.full((n, 1), self.cls_id, dtype=torch.long, device=ids.device)
        sep = torch.full((n, 1), self.sep_id, dtype=torch.long, device=ids.device)
        return torch.cat([cls, ids, sep], 1)

    def score(self, ids: torch.Tensor) -> torch.Tensor:
        """[n, l] -> [n]: mean log p over the l + 1 transitions of [CLS] ids [SEP] (nats)."""
        f = self.framed(ids)
        return self.logp(f[:, :-1], f[:, 1:]).mean(1)

    def swap_gains(self, ids: torch.Tensor) -> torch.Tensor:
        """[r, l] -> [r, l, V]: the exact change of `score` when t_i becomes v."""
        f = self.framed(ids).cpu()
        r, length = ids.shape
        left, right = f[:, :-2].reshape(-1), f[:, 2:].reshape(-1)  # [r * l] the neighbours of t_i
        into = self.rows.index_select(0, left).to_dense() + self.mix(left)[:, None] * self.p_uni  # p(v | a)
        out = (self.cols.index_select(0, right).to_dense()
               + self.mix(torch.arange(self.V))[None] * self.p_uni[right][:, None])  # p(c | v)
        new = into.log() + out.log()  # [r * l, V]
        cur = self.logp(left, f[:, 1:-1].reshape(-1)).double() + self.logp(f[:, 1:-1].reshape(-1), right).double()
        return ((new - cur[:, None]) / (length + 1)).float().view(r, length, self.V).to(ids.device)


class MaskedLMFluency:
    """Pseudo-log-likelihood under a masked LM (see the module docstring)."""

    def __init__(self, mlm: torch.nn.Module, mask_id: int, cls_id: int, sep_id: int, source: str,
                 batch_rows: int = 512):
        self.mlm, self.mask_id, self.cls_id, self.sep_id = mlm.eval(), mask_id, cls_id, sep_id
        self.name, self.batch_rows = f"mlm-pll:{source}", int(batch_rows)
        self.V = int(mlm.get_output_embeddings().weight.shape[0])

    @torch.no_grad()
    def masked_logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        """[n, l] -> [n, l, V]: log p(. | the sequence with position i masked), one forward per i."""
        n, length = ids.shape
        dev = next(self.mlm.parameters()).device
        f = torch.cat([torch.full((n, 1), self.cls_id), ids.cpu(), torch.full((n, 1), self.sep_id)], 1)
        masked = f[:, None].repeat(1, length, 1)  # [n, l, l + 2]
        pos = torch.arange(length)
        masked[:, pos, pos + 1] = self.mask_id
        flat = masked.view(n * length, length + 2)
        out = []
        for s in range(0, len(flat), self.batch_rows):
            part = flat[s:s + self.batch_rows].to(dev)
            logits = self.mlm(input_ids=part).logits.float()  # [b, l + 2, V]
            at = (torch.arange(s, s + len(part)) % length + 1).to(dev)
            out.append(logits[torch.arange(len(part), device=dev), at].log_softmax(-1).cpu())
        return torch.cat(out).view(n, length, self.V)

    def score(self, ids: torch.Tensor) -> torch.Tensor:
        lp = self.masked_logprobs(ids)
        return lp.gather(2, ids.cpu()[..., None])[..., 0].mean(1).to(ids.device)

    def swap_gains(self, ids: torch.Tensor) -> torch.Tensor:
        """[r, l] -> [r, l, V]: the change of `score` by the swapped position's own term."""
        lp = self.masked_logprobs(ids)
        return ((lp - lp.gather(2, ids.cpu()[..., None])) / ids.shape[1]).to(ids.device)


def masked_lm_of(path: str, trust_remote_code: bool = False) -> torch.nn.Module | None:
    """The masked-LM model at `path` with its head, or None when the checkpoint has no head
    weights (a bare encoder: its head would be random)."""
    from transformers import AutoModelForMaskedLM

    try:
        mlm, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True,
                                                         trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        log.debug("no masked-LM head at %s: %s", path, e)
        return None
    head = [k for k in info.get("missing_keys", []) if "embeddings" not in k]
    return None if head else mlm


def build_fluency(spec: str | None, encoder: object, vocab: object, model_path: str,
                  trust_remote_code: bool = False) -> BigramPrior | MaskedLMFluency:
    """`search.fluency_model`: `auto` (the analysed model's own masked-LM head if its checkpoint
    has one, else the bigram prior), `bigram` (the prior of the packaged corpus), `bigram:CORPUS`
    (a corpus spec, ft.data.corpus), or a local masked-LM directory of the same vocabulary."""
    from ft.data.corpus import DEFAULT_CORPUS, load_corpus

    tok = encoder.tokenizer
    V = int(encoder.word_embeddings.shape[0])
    spec = spec or "auto"
    if spec in ("auto", "self"):
        mlm = masked_lm_of(model_path, trust_remote_code)
        if mlm is not None:
            return MaskedLMFluency(mlm.to(encoder.word_embeddings.device), tok.mask_token_id, vocab.cls_id,
                                   vocab.sep_id, Path(model_path).name)
        if spec == "self":
            raise ConfigError(f"search.fluency_model=self: {model_path} has no masked-LM head; valid: auto, "
                              "bigram, bigram:CORPUS, or a masked-LM directory")
        spec = "bigram"
    if spec == "bigram" or spec.startswith("bigram:"):
        corpus = spec.split(":", 1)[1] if ":" in spec else DEFAULT_CORPUS
        c = load_corpus(corpus, tok)
        return BigramPrior(c.ids, V, vocab.cls_id, vocab.sep_id, corpus)
    if not Path(spec).is_dir():
        raise ConfigError(f"search.fluency_model={spec!r}: no such directory; valid: auto, self, bigram, "
                          "bigram:CORPUS, or a local masked-LM directory of the same vocabulary")
    check_weights_file(spec, spec, "search.fluency_model")  # a truncated file: by name, not a traceback
    mlm = masked_lm_of(spec, trust_remote_code)
    if mlm is None:
        raise ConfigError(f"search.fluency_model={spec!r} has no masked-LM head weights; valid: a masked-LM "
                          "checkpoint (e.g. saved BertForMaskedLM), or bigram")
    size = int(mlm.get_output_embeddings().weight.shape[0])
    if size != V:
        raise ConfigError(f"search.fluency_model={spec!r} has {size} tokens, the model {V}; valid: a masked LM "
                          "of the same vocabulary")
    check_same_vocabulary(spec, tok, trust_remote_code)
    return MaskedLMFluency(mlm.to(encoder.word_embeddings.device), tok.mask_token_id, vocab.cls_id, vocab.sep_id,
                           Path(spec).name)


def check_same_vocabulary(spec: str, tokenizer: object, trust_remote_code: bool = False,
                          key: str = "search.fluency_model") -> None:
    """The masked LM at `spec` reads ids with the analysed model's vocabulary: the same token for
    every id (a vocabulary of the same size but another order would score other words)."""
    from transformers import AutoTokenizer

    valid = "valid: a masked-LM directory saved with its tokenizer (tokenizer.json, vocab.txt, ...)"
    if not any((Path(spec) / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"{key}={spec!r} has no readable tokenizer (none of "
                          f"{', '.join(TOKENIZER_FILES)}); {valid}")
    try:
        other = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{key}={spec!r} has no readable tokenizer ({type(e).__name__}); "
                          f"{valid}") from None
    mine, theirs = tokenizer.get_vocab(), other.get_vocab()
    if mine == theirs:
        return
    differ = sorted(t for t in mine.keys() | theirs.keys() if mine.get(t) != theirs.get(t))
    t = min(differ, key=lambda t: (mine.get(t, len(mine)), t))
    raise ConfigError(f"{key}={spec!r} has another vocabulary than the model ({len(differ)} tokens "
                      f"differ, e.g. {t!r} is id {mine.get(t)} in the model and {theirs.get(t)} there); "
                      "valid: a masked LM of the same vocabulary")


def check_weights(weights: object) -> list[float]:
    """`search.fluency_weights`: a list of finite numbers >= 0 (a single number is a one-item list)."""
    if isinstance(weights, (int, float)) and not isinstance(weights, bool):
        weights = [weights]
    try:
        out = [float(w) for w in weights]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        out = []
    if not out or any(isinstance(w, bool) for w in weights) or any(not math.isfinite(w) or w < 0 for w in out):
        raise ConfigError(f"search.fluency_weights={weights!r}; valid: a list of numbers >= 0, e.g. [0, 0.5, 2]")
    if len(set(out)) != len(out):
        raise ConfigError(f"search.fluency_weights={weights!r} repeats a weight; valid: distinct weights")
    return out
