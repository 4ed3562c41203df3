"""Tiny random models of every supported family, built in-process from their config classes and
saved with `save_pretrained` beside a tokenizer also built in-process (no hub): WordPiece for
BERT, ELECTRA and DistilBERT, byte-level BPE for the RoBERTa family. Biases and LayerNorm
weights are random too, so that a wrong module or a dropped bias shows."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModel,
    BertConfig,
    BertTokenizerFast,
    CamembertConfig,
    DistilBertConfig,
    ElectraConfig,
    RobertaConfig,
    RobertaTokenizerFast,
    XLMRobertaConfig,
)

from tests.conftest import VOCAB, WORDS

FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "deberta-v2", "modernbert",
            "albert")
BPE_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def bpe_tokenizer(vocab_size: int = 300) -> RobertaTokenizerFast:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(WORDS)] * 20, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=BPE_SPECIAL, show_progress=False)
    return RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                mask_token="<mask>")


def wordpiece_tokenizer() -> BertTokenizerFast:
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)}, do_lower_case=True)


def family_config(family: str, vocab_size: int, pad_id: int, positions: int = 16) -> object:
    common = dict(vocab_size=vocab_size, max_position_embeddings=positions)
    if family == "distilbert":
        return DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=2, pad_token_id=pad_id, **common)
    if family == "deberta-v2":
        from transformers import DebertaV2Config

        return DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               relative_attention=True, pos_att_type=["p2c", "c2p"], position_biased_input=False,
                               max_relative_positions=-1, position_buckets=8, pad_token_id=pad_id, **common)
    if family == "modernbert":
        from transformers import ModernBertConfig

        return ModernBertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                global_attn_every_n_layers=2, local_attention=4, pad_token_id=pad_id,
                                cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3,
                                vocab_size=vocab_size, max_position_embeddings=64)
    if family == "albert":
        from transformers import AlbertConfig

        return AlbertConfig(embedding_size=16, hidden_size=32, num_hidden_layers=3, num_hidden_groups=1,
                            num_attention_heads=2, intermediate_size=64, pad_token_id=pad_id, **common)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **common)
    if family == "electra":
        return ElectraConfig(embedding_size=16, pad_token_id=pad_id, **shape)
    if family == "bert":
        return BertConfig(pad_token_id=pad_id, **shape)
    make = {"roberta": RobertaConfig, "xlm-roberta": XLMRobertaConfig, "camembert": CamembertConfig}[family]
    shape["max_position_embeddings"] = positions + pad_id + 1  # RoBERTa counts positions from pad + 1
    return make(pad_token_id=pad_id, bos_token_id=0, eos_token_id=2, type_vocab_size=1, **shape)


def build_family(path: Path, family: str, seed: int = 0, vocab_size: int | None = None) -> Path:
    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tok = bpe_tokenizer() if family in ("roberta", "xlm-roberta", "camembert") else wordpiece_tokenizer()
    cfg = family_config(family, vocab_size or len(tok), int(tok.pad_token_id))
    model = AutoModel.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
            elif "norm" in name.lower() and name.endswith("weight"):
                p.normal_(1.0, 0.1)
        model.get_input_embeddings().weight.normal_(0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_large_vocab(path: Path, vocab_size: int = 250_002, seed: int = 0) -> Path:
    """XLM-R-shaped: a 250,002-token vocabulary (the tiny words plus synthetic pieces) on a tiny
    XLMRobertaModel, with a byte-level-style BPE tokenizer over it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tokens = BPE_SPECIAL + WORDS + [f"w{i}" for i in range(vocab_size - len(BPE_SPECIAL) - len(WORDS))]
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = RobertaTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                               cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    cfg = XLMRobertaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=18, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, type_vocab_size=1)
    model = AutoModel.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
        model.get_input_embeddings().weight.normal_(0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
