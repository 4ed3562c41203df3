"""A tiny random BERT (with a real WordPiece tokenizer) built in-process; no network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from ft.model.encoder import Encoder, load_encoder

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Frequent English words (wordfreq's top list picks from these) + other words + pieces.
WORDS = (
    "the of and to in is that for it was on with he as you at be this have from or one had by "
    "but not what all were we when your can said there use an each which she do how their if "
    "will up other about out many then them these so some her would make like him into time "
    "has look two more write go see number no way could people my than first water been call "
    "who oil its now find long down day did get come made may part sofa couch pillow unit river "
    "bank money house garden music piano violin guitar apple banana cherry grape lemon mango "
    "table chair window door floor wall roof cat dog horse cow sheep goat mouse bird fish"
).split()
PIECES = ["##s", "##ed", "##ing", "##ly", "##er", "##est", "##ion", "##al", "1", "2", "3", "!", "."]
VOCAB = SPECIAL + WORDS + PIECES


def build_tiny(path: Path, layers: int = 2, hidden: int = 32, seed: int = 0, pos_std: float | None = None) -> Path:
    """`pos_std`: position embeddings as large as the word embeddings, so that the analysis
    space differs from one position to the next (a wrong read position then shows)."""
    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)}, do_lower_case=True)
    cfg = BertConfig(
        vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=16,
    )
    model = BertModel(cfg)
    with torch.no_grad():  # spread the embeddings a little so words differ clearly
        model.embeddings.word_embeddings.weight.normal_(0, 0.5)
        if pos_std is not None:
            model.embeddings.position_embeddings.weight.normal_(0, pos_std)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def pos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT whose positions matter in the analysis space."""
    return build_tiny(tmp_path_factory.mktemp("tiny_pos"), seed=1, pos_std=0.5)


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> Encoder:
    return load_encoder(str(tiny_dir))


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Caches and W&B files go to the test's temp dir; W&B never goes online."""
    monkeypatch.setenv("FT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
