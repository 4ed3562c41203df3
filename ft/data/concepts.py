"""Concepts as data: labelled words (or labelled tokens in sentences) that a probe learns to tell apart.

A concept spec is one of
- `builtin:NAME` (months, weekdays, numbers, colours, kinship): the concept's words, label 1,
  against 3 x as many other words of the vocabulary with matching frequency (wordfreq's Zipf
  frequency, nearest first, seeded ties), label 0: no download;
- a `.csv` / `.tsv` / `.txt` file of `word,label` rows (one word per row, any labels);
- a `.conll` file: token-labelled sentences, one `token<TAB>label` per line (the last column is the
  label), a blank line between sentences; each word is read at its first word piece in context.
Every word must be one token of the model's vocabulary (word lists) or is split into pieces
(sentences).
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass
from pathlib import Path

from ft.core.errors import ConfigError

BUILTIN = {
    "months": "january february march april may june july august september october november december",
    "weekdays": "monday tuesday wednesday thursday friday saturday sunday",
    "numbers": "one two three four five six seven eight nine ten eleven twelve twenty hundred thousand",
    "colours": "red green blue yellow black white orange purple pink brown grey gray",
    "kinship": "mother father sister brother daughter son aunt uncle cousin grandmother grandfather wife husband",
}
NEGATIVES_PER_WORD = 3


@dataclass
class Concept:
    """Labelled examples: `sentences[i]` is a list of words, `labels[i]` one label per word;
    a word list is one-word sentences."""

    name: str
    sentences: list[list[str]]
    labels: list[list[str]]

    @property
    def words(self) -> list[str]:
        return [w for s in self.sentences for w in s]

    @property
    def flat_labels(self) -> list[str]:
        return [lab for s in self.labels for lab in s]

    @property
    def is_word_list(self) -> bool:
        return all(len(s) == 1 for s in self.sentences)


def is_word(token: str) -> bool:
    return token.isalpha() and len(token) >= 3 and token.isascii()


def builtin(name: str, tokenizer: object, seed: int = 0) -> Concept:
    from wordfreq import zipf_frequency

    if name not in BUILTIN:
        raise ConfigError(f"concept=builtin:{name}; valid: {', '.join('builtin:' + n for n in BUILTIN)}, or a file")
    vocab = tokenizer.get_vocab()
    words = [w for w in BUILTIN[name].split() if w in vocab]
    if len(words) < 2:
        raise ConfigError(f"concept=builtin:{name}: only {len(words)} of its words are tokens of this model's "
                          "vocabulary; valid: a concept file with the model's own words")
    taken = {w for ws in BUILTIN.values() for w in ws.split()}
    pool = sorted(t for t in vocab if is_word(t) and t not in taken)
    freq = {t: zipf_frequency(t, "en") for t in pool + words}
    rng = random.Random(seed)
    rng.shuffle(pool)  # seeded ties
    others: list[str] = []
    for w in words:  # the nearest-frequency unused words, NEGATIVES_PER_WORD per concept word
        near = sorted((t for t in pool if t not in others), key=lambda t: abs(freq[t] - freq[w]))
        others += near[:NEGATIVES_PER_WORD]
    items = [(w, "1") for w in words] + [(w, "0") for w in others]
    return Concept(f"builtin:{name}", [[w] for w, _ in items], [[lab] for _, lab in items])


def read_text(path: Path) -> str:
    """The concept file as UTF-8 text (a byte-order mark dropped); ConfigError naming the file and
    the line of the first byte that is not UTF-8."""
    from ft.data.corpus import read_utf8

    return read_utf8(path, "concept")


def read_word_file(path: Path) -> Concept:
    sentences, labels = [], []
    text = read_text(path)
    dialect = "excel-tab" if path.suffix == ".tsv" or "\t" in text[:4096] else "excel"
    with io.StringIO(text, newline="") as f:
        for i, row in enumerate(csv.reader(f, dialect=dialect), 1):
            row = [c.strip() for c in row]
            if not row or not any(row) or row[0].startswith("#"):
                continue
            if len(row) < 2 or not row[0] or not row[1]:
                raise ConfigError(f"concept={path}: line {i} is {row!r}; valid: `word,label` rows")
            if i == 1 and row[0].lower() == "word" and row[1].lower() == "label":
                continue  # a header
            sentences.append([row[0]])
            labels.append([row[1]])
    return Concept(str(path), sentences, labels)


def read_conll(path: Path) -> Concept:
    sentences, labels, s, lab = [], [], [], []
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            if s:
                sentences.append(s)
                labels.append(lab)
            s, lab = [], []
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        if len(cols) < 2:
            raise ConfigError(f"concept={path}: line {i} is {line!r}; valid: `token<TAB>label` lines, "
                              "a blank line between sentences")
        s.append(cols[0])
        lab.append(cols[-1])
    if s:
        sentences.append(s)
        labels.append(lab)
    return Concept(str(path), sentences, labels)


def load_concept(spec: str, tokenizer: object, seed: int = 0) -> Concept:
    """The concept `spec` names (module docstring), checked: two labels or more, each used twice."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"concept={spec!r}; valid: builtin:NAME ({', '.join(BUILTIN)}) or a file")
    if spec.startswith("builtin:"):
        concept = builtin(spec.split(":", 1)[1], tokenizer, seed)
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"concept={spec!r}: no such file; valid: builtin:NAME ({', '.join(BUILTIN)}), a "
                              "word,label file (.csv, .tsv, .txt) or a .conll file")
        concept = read_conll(path) if path.suffix == ".conll" else read_word_file(path)
    counts: dict[str, int] = {}
    for lab in concept.flat_labels:
        counts[lab] = counts.get(lab, 0) + 1
    if len(counts) < 2 or min(counts.values()) < 2:
        raise ConfigError(f"concept={spec!r} has labels {counts}; valid: at least 2 labels, each on 2 words or more")
    if concept.is_word_list:
        if getattr(tokenizer, "do_lower_case", False):  # an uncased vocabulary: its words are lower case
            concept.sentences = [[w.lower() for w in s] for s in concept.sentences]
        seen: dict[str, str] = {}
        for w, lab in zip(concept.words, concept.flat_labels, strict=True):  # one row per word type: a repeat
            if w in seen:  # would weigh it twice and could land in both the training and held-out split
                again = "again" if seen[w] == lab else f"as {lab!r} after {seen[w]!r}"
                raise ConfigError(f"concept={spec!r}: the word {w!r} is listed {again}; valid: each word once, "
                                  "with one label")
            seen[w] = lab
        vocab = tokenizer.get_vocab()
        missing = [w for w in concept.words if w not in vocab]
        if missing:
            raise ConfigError(f"concept={spec!r}: {missing[:5]} are not single tokens of the vocabulary; valid: "
                              "words of the model's vocabulary (or a .conll file of sentences)")
    return concept
