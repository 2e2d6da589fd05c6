"""Corpora: finding the text, and the contiguous train/validation/test split.

Resolution order for a corpus: an explicit --data path (a file, or a folder holding the file by
name), then $CHARRNN_DATA_DIR, then the copy shipped gzipped inside this package (train/data/), so
every preset runs offline. Known files found by name are checked against their sha256; a file given
with --data is the user's choice (any UTF-8 text) and is used as given.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SPLIT = (0.90, 0.05, 0.05)  # train, validation, test: contiguous, made before any windowing
EMBEDDED = Path(__file__).resolve().parent / "data"  # <filename>.gz, shipped as package data


class CorpusError(Exception):
    """The corpus cannot be found, read or trusted. The message says how to provide it."""


@dataclass(frozen=True)
class Corpus:
    name: str
    filename: str
    sha256: str  # of the uncompressed text

    @property
    def embedded(self) -> Path:
        return EMBEDDED / f"{self.filename}.gz"


CORPORA = {
    # data/tinyshakespeare/input.txt of karpathy/char-rnn, the copy the seed trained on
    "tinyshakespeare": Corpus("tinyshakespeare", "tinyshakespeare.txt",
                              "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    # the seed's problem 1 text, exactly as its script held it
    "prediction": Corpus("prediction", "prediction.txt",
                         "33b02598c2fb5de70e965e3f9e23748aa08be565cf3033d49b648365de71e677"),
}

# Prompts the seed used, as (start, end) offsets into the corpus (see the seed's README).
PROMPTS = {
    "tinyshakespeare": (657883, 658329),  # WARWICK: "So much his friend" ... "safety of our country."
    "prediction": (743, 1333),  # ... "Training a model for next character predic" (expected next: "t")
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return _sha256(text.encode("utf-8"))


def _read_bytes(path: Path) -> bytes:
    data = Path(path).read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def _checked(path: Path, corpus: Corpus) -> Path:
    digest = _sha256(_read_bytes(path))
    if digest != corpus.sha256:
        raise CorpusError(
            f"{path} is not the expected {corpus.filename} (sha256 {digest[:12]}..., expected "
            f"{corpus.sha256[:12]}...): delete or replace it, or pass the file you mean with --data"
        )
    return path


def resolve(name: str, data: Path | None = None) -> Path:
    """The path of corpus `name`, found as the module docstring says."""
    corpus = CORPORA[name]
    if data is not None:
        data = Path(data)
        path = data / corpus.filename if data.is_dir() else data
        if not path.is_file():
            raise CorpusError(f"--data {data}: no such file (expected a text file, or a folder holding "
                              f"{corpus.filename} for corpus {name!r})")
        if data.is_dir():
            return _checked(path, corpus)
        load_text(path)  # a user's file: any UTF-8 text, refused now rather than in every model's worker
        return path
    env = os.environ.get("CHARRNN_DATA_DIR")
    if env and (Path(env) / corpus.filename).is_file():
        return _checked(Path(env) / corpus.filename, corpus)
    if env:
        log.debug("%s has no %s: using the embedded copy", env, corpus.filename)
    if not corpus.embedded.is_file():
        raise CorpusError(f"the package's copy of {corpus.filename} is missing ({corpus.embedded}): reinstall "
                          f"charrnn, or pass --data PATH or set CHARRNN_DATA_DIR to a folder holding it")
    return _checked(corpus.embedded, corpus)


def load_text(path: Path) -> str:
    """The text of a corpus file (gzipped when its name ends in .gz), which must be UTF-8."""
    try:
        return _read_bytes(Path(path)).decode("utf-8")
    except OSError as e:
        raise CorpusError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text ({e})") from None


def split(text: str) -> tuple[str, str, str]:
    """Contiguous 90/5/5 train/validation/test split of the raw text."""
    n = len(text)
    a = int(n * SPLIT[0])
    b = a + int(n * SPLIT[1])
    return text[:a], text[a:b], text[b:]


def prompt(name: str, text: str) -> str:
    """The seed's prompt for this corpus; for any other text (a user's --data file), its first 256 characters."""
    start, end = PROMPTS[name]
    return text[start:end] if sha256_text(text) == CORPORA[name].sha256 else text[:256]
