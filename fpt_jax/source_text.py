"""The pretrained model's own modality, embedded: real text, tokenized by the checkpoint's
tokenizer and embedded by its word-embedding table (the source side of the alignment stage,
`fpt_jax.align`).

  corpus     `read_corpus(directory)`: every regular text file of a directory is a class,
             its documents separated by lines holding only '%' (the fortune format) or, in a
             file without them, by blank lines. The default is Debian's `fortunes` package,
             /usr/share/games/fortunes: quotations, jokes and definitions in ~60 categories.
  features   `text_features`: one vector per document, the mean of its first 128 tokens'
             word-embedding rows, what the backbone's input would be for that text
             (`inputs_embeds` stands in for exactly those rows).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from fpt_jax import weights

DEFAULT_CORPUS = "/usr/share/games/fortunes"
MAX_TOKENS = 128
# A checkpoint's word-embedding table, by family: GPT-2, BERT/MiniLM, Llama-family.
EMBEDDING_KEYS = ("wte.weight", "word_embeddings.weight", "embed_tokens.weight")
_SKIPPED_SUFFIXES = (".dat", ".u8", ".gz", ".json")  # the fortune index files, archives


@dataclasses.dataclass
class Corpus:
    texts: list[str]
    labels: np.ndarray  # [N] int: the index of the document's file in `classes`
    classes: tuple[str, ...]
    directory: str


def read_corpus(directory: str | os.PathLike = DEFAULT_CORPUS, min_chars: int = 20) -> Corpus:
    """Every document (at least `min_chars` long) of the directory's text files."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"align_corpus={directory}: no such directory; accepted: a directory "
                         "of text files (one class each), e.g. Debian's fortunes "
                         f"({DEFAULT_CORPUS}: apt-get install fortunes)")
    texts, labels, classes = [], [], []
    for file in sorted(directory.iterdir()):
        if not file.is_file() or file.name.startswith(".") or file.suffix in _SKIPPED_SUFFIXES:
            continue
        try:
            content = file.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise ValueError(f"align_corpus: cannot read {file} ({e})") from None
        lines = content.splitlines()
        if any(line.strip() == "%" for line in lines):
            docs = "\n".join(lines).split("\n%\n")
        else:
            docs = content.split("\n\n")
        docs = [d.strip().strip("%").strip() for d in docs]
        docs = [d for d in docs if len(d) >= min_chars]
        if docs:
            texts.extend(docs)
            labels.extend([len(classes)] * len(docs))
            classes.append(file.name)
    if len(texts) < 20:
        raise ValueError(f"align_corpus={directory} holds {len(texts)} documents of at least "
                         f"{min_chars} characters; accepted: a directory of text files with "
                         "20 or more")
    return Corpus(texts, np.asarray(labels, np.int32), tuple(classes), str(directory))


def largest_classes(corpus: Corpus, n: int) -> Corpus:
    """The documents of the `n` largest classes, relabelled 0..n-1 (largest first)."""
    counts = np.bincount(corpus.labels, minlength=len(corpus.classes))
    keep = np.argsort(-counts, kind="stable")[:n]
    new = {int(c): i for i, c in enumerate(keep)}
    rows = [i for i, label in enumerate(corpus.labels) if int(label) in new]
    return Corpus([corpus.texts[i] for i in rows],
                  np.asarray([new[int(corpus.labels[i])] for i in rows], np.int32),
                  tuple(corpus.classes[c] for c in keep), corpus.directory)


def word_embeddings(directory: str | os.PathLike) -> np.ndarray:
    """The word-embedding table `[vocab, width]` (float32) of a Hugging Face checkpoint's
    safetensors file(s), read alone (safetensors opens one tensor, not the whole file)."""
    from safetensors import safe_open
    files = sorted(Path(directory).glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():
                if key.endswith(EMBEDDING_KEYS):
                    return np.asarray(f.get_tensor(key), np.float32)
    raise ValueError(f"{directory}: no word-embedding table ({', '.join(EMBEDDING_KEYS)}) in "
                     f"{[f.name for f in files] or 'any *.safetensors file'}; the alignment "
                     "stage needs a Hugging Face checkpoint with safetensors weights")


def tokenizer(directory: str | os.PathLike):
    """The checkpoint's own tokenizer (its tokenizer.json), without padding, at most
    MAX_TOKENS tokens."""
    file = Path(directory) / "tokenizer.json"
    if not file.is_file():
        raise ValueError(f"{directory} has no tokenizer.json: the alignment stage embeds text "
                         "with the checkpoint's own tokenizer")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(file))
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    return tok


def text_features(texts: list[str], directory: str | os.PathLike) -> np.ndarray:
    """`[N, width]`: each text's mean word-embedding row under the checkpoint in `directory`
    (a text that encodes to no token, or to ids beyond the table, is an error)."""
    table = word_embeddings(directory)
    tok = tokenizer(directory)
    out = np.empty((len(texts), table.shape[1]), np.float32)
    for i, enc in enumerate(tok.encode_batch(texts, add_special_tokens=False)):
        ids = np.asarray(enc.ids, np.int64)
        if not len(ids) or ids.max() >= len(table):
            raise ValueError(f"text {i} ({texts[i][:40]!r}) encodes to {len(ids)} tokens "
                             f"(max id {ids.max() if len(ids) else '-'}) for a table of "
                             f"{len(table)} rows: the tokenizer is not the checkpoint's")
        out[i] = table[ids].mean(0)
    return out


def checkpoint_directory(source: str) -> Path:
    """The local directory of a weight source (a directory, a named source, a hub name)."""
    if Path(source).is_dir():
        return Path(source)
    if source in weights.NAMED_SOURCES:
        return weights.named_source(source)
    return weights.download(source)
