"""Word substitutes for local search: a masked LM's top predictions, or nearest embeddings.

`build_substitutes(spec, encoder)`:
- ``auto``: the analysed model's own MLM head when its checkpoint has one, else nearest
  embeddings (the packaged MiniLM has no MLM head);
- ``nearest``: the n closest word embeddings (cosine) of the analysed model;
- any other string: a ``*ForMaskedLM`` by name or local path; its vocabulary must be the
  analysed model's (substitutes are token ids of that model).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ft.core.errors import ConfigError, ModelNotFoundError
from ft.model.encoder import Encoder, resolve

log = logging.getLogger("ft")


class NearestEmbeddings:
    """Substitutes for token t: the tokens whose input embeddings are closest to t's."""

    def __init__(self, encoder: Encoder):
        W = torch.nn.functional.normalize(encoder.word_embeddings.detach().float().cpu(), dim=-1)
        self.unit = W
        self.banned = torch.tensor(sorted(set(encoder.tokenizer.all_special_ids)), dtype=torch.long)
        self.name = "nearest-embedding"

    @torch.no_grad()
    def __call__(self, tokens: Sequence[int], positions: Sequence[int], n: int) -> list[list[int]]:
        sims = self.unit[[tokens[i] for i in positions]] @ self.unit.T
        sims[:, self.banned] = -2
        sims[torch.arange(len(positions)), [tokens[i] for i in positions]] = -2  # not the token itself
        return sims.topk(min(n, sims.shape[1]), dim=1).indices.tolist()


class MaskedLM:
    """Substitutes for position i: the masked LM's top-n tokens for [MASK] at i."""

    def __init__(self, model: torch.nn.Module, tokenizer: object, name: str):
        self.model = model.eval()
        self.mask_id, self.cls_id, self.sep_id = tokenizer.mask_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id
        self.banned = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.name = f"mlm:{name}"

    @torch.no_grad()
    def __call__(self, tokens: Sequence[int], positions: Sequence[int], n: int) -> list[list[int]]:
        rows = []
        for i in positions:
            seq = [self.cls_id, *tokens, self.sep_id]
            seq[i + 1] = self.mask_id
            rows.append(seq)
        logits = self.model(input_ids=torch.tensor(rows)).logits.float()
        logits = logits[torch.arange(len(positions)), [i + 1 for i in positions]]
        logits[:, self.banned] = -float("inf")
        logits[torch.arange(len(positions)), [tokens[i] for i in positions]] = -float("inf")
        return logits.topk(min(n, logits.shape[1]), dim=1).indices.tolist()


def _load_mlm(name_or_path: str) -> tuple[torch.nn.Module, dict]:
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a missing head is expected and reported by ft, in one line
    try:
        return AutoModelForMaskedLM.from_pretrained(resolve(name_or_path), output_loading_info=True)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"masked LM {name_or_path!r} could not be loaded ({type(e).__name__}); "
                                 "valid: auto, nearest, or a *ForMaskedLM name/path available offline") from e
    finally:
        hf_logging.set_verbosity(level)


def build_substitutes(spec: str, encoder: Encoder, model_name: str) -> MaskedLM | NearestEmbeddings:
    if spec == "nearest":
        return NearestEmbeddings(encoder)
    name = model_name if spec == "auto" else spec
    try:
        mlm, info = _load_mlm(name)
    except ModelNotFoundError:
        if spec != "auto":
            raise
        mlm, info = None, {}
    # the head is whatever lies outside the base model (BERT's cls.*, RoBERTa's lm_head.*, ...)
    no_head = mlm is None or any(not k.startswith(f"{mlm.base_model_prefix}.") for k in info["missing_keys"])
    if spec == "auto" and no_head:
        log.warning("the analysed model has no masked-LM head: local search uses nearest-embedding "
                    "substitutes (pass --mlm NAME for a masked LM with the same vocabulary)")
        return NearestEmbeddings(encoder)
    if int(mlm.config.vocab_size) != encoder.vocab_size:
        raise ConfigError(f"masked LM {name!r} has a vocabulary of {mlm.config.vocab_size} tokens, the analysed "
                          f"model {encoder.vocab_size}; valid: a masked LM with the analysed model's vocabulary")
    return MaskedLM(mlm, encoder.tokenizer, name)
