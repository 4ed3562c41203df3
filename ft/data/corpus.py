"""Text corpora for dataset examples: read, split into sentences, tokenize once, cache.

A corpus spec is one of
- ``packaged:lee`` (the default): the Lee news corpus (300 ABC news articles, English)
  shipped in the PyPI package ``gensim`` as test data -- read as a file, gensim is never
  imported, so it installs with ``--no-deps`` and needs no network;
- a ``.txt`` file, or a folder (every ``*.txt`` under it, sorted);
- ``hf:PATH[:COLUMN]``: a Hugging Face dataset saved locally with ``save_to_disk``
  (needs the ``datasets`` package; COLUMN defaults to ``text``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ft.core.errors import ConfigError
from ft.core.files import atomic_write, cache_dir

log = logging.getLogger("ft")
DEFAULT_CORPUS = "packaged:lee"

# A sentence ends at . ! ? (and closing quotes/brackets) followed by whitespace and an
# upper-case letter, a digit or an opening quote -- unless the word before is an abbreviation.
_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREV = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "inc", "ltd", "co", "corp",
           "gen", "gov", "sen", "rep", "lt", "col", "sgt", "capt", "no", "jan", "feb", "mar", "apr",
           "aug", "sep", "sept", "oct", "nov", "dec", "u.s", "u.n", "e.g", "i.e", "a.m", "p.m"}


def split_sentences(text: str) -> list[str]:
    """Sentences of a text (a rule-based splitter: English prose, abbreviations kept whole)."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n|\r?\n", text):
        para = " ".join(para.split())
        start = 0
        for m in _END.finditer(para):
            end = m.start() + len(m.group().rstrip())  # keep closing quotes and brackets
            before = para[start:end].rstrip("\"')]").split()
            last = before[-1].rstrip(".!?").lower() if before else ""
            if last in _ABBREV or (len(last) == 1 and last.isalpha()):
                continue  # "Mr. Smith", "J. Smith": not an end
            out.append(para[start:end].strip())
            start = m.end()
        out.append(para[start:].strip())
    return [s for s in out if len(s) > 1]


def packaged_lee_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("corpus 'packaged:lee' needs the package gensim (its test data holds the Lee "
                          "corpus): pip install --no-deps gensim==4.4.0; or pass corpus=PATH to a .txt file")
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / "lee_background.cor"
    if not path.exists():
        raise ConfigError(f"the installed gensim has no {path.name}; pass corpus=PATH to a .txt file")
    return path


def read_utf8(path: Path, key: str = "corpus") -> str:
    """A user's text file as UTF-8 (a byte-order mark dropped); ConfigError naming `key`, the file
    and the line of the first byte that is not UTF-8 (a Latin-1 file would otherwise read as
    replacement characters, silently [UNK] tokens)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{key}={str(path)!r}: cannot read it ({e.strerror or e}); valid: a readable "
                          "file") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{key}={str(path)!r}: line {line} is not UTF-8 (byte 0x{data[e.start]:02x}); valid: a "
                          "UTF-8 file (re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`)") from None


def read_texts(spec: str) -> list[str]:
    """The raw documents of a corpus spec (see the module docstring)."""
    if spec == DEFAULT_CORPUS:
        return packaged_lee_path().read_text(encoding="utf-8", errors="replace").splitlines()
    if spec.startswith("hf:"):
        path, _, column = spec[3:].partition(":")
        try:
            import datasets
        except ImportError as e:
            raise ConfigError(f"corpus {spec!r} needs the package datasets (pip install datasets)") from e
        try:
            ds = datasets.load_from_disk(path)
        except (OSError, ValueError) as e:  # FileNotFoundError: not a saved dataset
            raise ConfigError(f"corpus {spec!r}: {path!r} is not a dataset saved with save_to_disk "
                              f"({type(e).__name__}); valid: hf:PATH[:COLUMN]") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
        column = column or "text"
        if column not in ds.column_names:
            raise ConfigError(f"corpus {spec!r}: no column {column!r}; valid: {ds.column_names}")
        return [str(t) for t in ds[column]]
    p = Path(spec)
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise ConfigError(f"corpus folder {spec!r} holds no *.txt files")
        return [read_utf8(f) for f in files]
    if p.is_file():
        return [read_utf8(p)]
    raise ConfigError(f"corpus {spec!r} not found; valid: {DEFAULT_CORPUS}, a .txt file, a folder of .txt "
                      "files, or hf:PATH[:COLUMN] (a dataset saved with save_to_disk)")


@dataclass
class Corpus:
    """Sentences and their token ids (no special tokens), in corpus order."""

    spec: str
    sentences: list[str]
    ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.sentences)


def load_corpus(spec: str, tokenizer: object, max_tokens: int = 64, use_cache: bool = True) -> Corpus:
    """Read, split and tokenize a corpus; the token ids are cached (keyed by text + tokenizer).

    Sentences longer than `max_tokens` word pieces are cut; empty ones are dropped.
    """
    if max_tokens < 1:
        raise ConfigError(f"max_tokens={max_tokens}; valid: an integer >= 1")
    sentences = [s for text in read_texts(spec) for s in split_sentences(text)]
    if not sentences:
        raise ConfigError(f"corpus {spec!r} has no sentences")
    h = hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    # its normalizer (lower case, accents) and splitting: the same vocabulary tokenizes otherwise without them
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = repr(getattr(tokenizer, "init_kwargs", ""))
    if backend is not None:  # less its truncation and padding, which each call sets
        rules = json.dumps({k: v for k, v in json.loads(backend.to_str()).items()
                            if k not in ("truncation", "padding")}, sort_keys=True)
    h.update(f"{type(tokenizer).__name__}\n{rules}\n".encode())
    h.update(f"{max_tokens}\n".encode() + "\n".join(sentences).encode())
    path = cache_dir() / "corpus" / f"{h.hexdigest()[:20]}.safetensors"
    ids = None
    if use_cache and path.exists():
        try:
            t = load_file(str(path))
            flat, offsets = t["ids"].tolist(), t["offsets"].tolist()
            ids = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
            if len(ids) != len(sentences):
                raise ValueError("sentence count differs")
        except (SafetensorError, KeyError, ValueError, OSError) as e:
            log.warning("corpus cache %s is unreadable (%s): tokenizing again", path, e)
            ids = None
    if ids is None:
        ids = tokenizer(sentences, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
        if use_cache:
            flat = torch.tensor([i for s in ids for i in s], dtype=torch.long)
            offsets = torch.tensor([0, *torch.tensor([len(s) for s in ids]).cumsum(0).tolist()], dtype=torch.long)
            atomic_write(path, lambda p: save_file({"ids": flat, "offsets": offsets}, str(p)))
    keep = [i for i, s in enumerate(ids) if s]
    return Corpus(spec, [sentences[i] for i in keep], [ids[i] for i in keep])


def corpus_path(spec: str) -> Path:
    """The file or folder a corpus spec reads: hf:PATH[:COLUMN]'s PATH, else the spec itself (a
    file name may hold a colon)."""
    return Path(spec[3:].split(":")[0]) if spec.startswith("hf:") else Path(spec)
