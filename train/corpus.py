"""Corpora: finding (or downloading) the text, and the contiguous train/validation/test split.

Resolution order for a corpus file: an explicit --data path (a file, or a folder holding the file
by name), $CHARRNN_DATA_DIR, the user cache, then a download (tiny Shakespeare only), checked
against its sha256 and written atomically into the cache.
"""
from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from train.checkpoint import atomic_write

log = logging.getLogger(__name__)

SPLIT = (0.90, 0.05, 0.05)  # train, validation, test: contiguous, made before any windowing


class CorpusError(Exception):
    """The corpus cannot be found, downloaded or trusted. The message says how to provide it."""


@dataclass(frozen=True)
class Corpus:
    name: str
    filename: str
    sha256: str
    vocab_size: int  # of the reference file (for --dry-run without it)
    url: str | None = None  # None: no public copy, the user must provide the file


CORPORA = {
    "tinyshakespeare": Corpus(
        "tinyshakespeare", "tinyshakespeare.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 65,
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    ),
    "prediction": Corpus(  # the seed's problem 1 text
        "prediction", "prediction.txt", "33b02598c2fb5de70e965e3f9e23748aa08be565cf3033d49b648365de71e677", 46,
    ),
}

# Prompts the seed used, as (start, end) offsets into the corpus (see shared/seed/README.md).
PROMPTS = {
    "tinyshakespeare": (657883, 658329),  # WARWICK: "So much his friend" ... "safety of our country."
    "prediction": (743, 1333),  # ... "Training a model for next character predic" (expected next: "t")
}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "charrnn"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return _sha256(text.encode("utf-8"))


def _checked(path: Path, corpus: Corpus) -> Path:
    digest = _sha256(path.read_bytes())
    if digest != corpus.sha256:
        raise CorpusError(
            f"{path} is not the expected {corpus.filename} (sha256 {digest[:12]}..., expected "
            f"{corpus.sha256[:12]}...): delete or replace it, or pass the right file with --data"
        )
    return path


def download(url: str, dest: Path, sha256: str, timeout: float = 30) -> Path:
    """Fetch url, check its sha256, then write dest atomically; a bad checksum writes nothing."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = r.read()
    except OSError as e:
        raise CorpusError(f"could not download {url} ({e})") from None
    if _sha256(data) != sha256:
        raise CorpusError(f"download from {url} has sha256 {_sha256(data)}, expected {sha256}: not used")
    atomic_write(dest, data)
    return dest


def resolve(name: str, data: Path | None = None, allow_download: bool = True) -> Path:
    """The path of corpus `name`, found or downloaded as the module docstring says."""
    corpus = CORPORA[name]
    if data is not None:
        data = Path(data)
        path = data / corpus.filename if data.is_dir() else data
        if not path.is_file():
            raise CorpusError(f"--data {data}: no such file (expected {corpus.filename} for corpus {name!r})")
        return path  # an explicit file is the user's choice: used as given, its sha256 recorded
    places = [Path(d) / corpus.filename for d in [os.environ.get("CHARRNN_DATA_DIR")] if d]
    places.append(cache_dir() / corpus.filename)
    for path in places:
        if path.is_file():
            return _checked(path, corpus)
    how = f"pass --data PATH (the file or its folder) or set CHARRNN_DATA_DIR to a folder holding {corpus.filename}"
    if corpus.url is None or not allow_download:
        raise CorpusError(f"corpus {name!r} ({corpus.filename}) not found and has no public download: {how}")
    log.info("downloading %s to %s", corpus.url, cache_dir())
    try:
        return download(corpus.url, cache_dir() / corpus.filename, corpus.sha256)
    except CorpusError as e:
        raise CorpusError(f"{e}; offline? {how}") from None


def load_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text ({e})") from None


def split(text: str) -> tuple[str, str, str]:
    """Contiguous 90/5/5 train/validation/test split of the raw text."""
    n = len(text)
    a = int(n * SPLIT[0])
    b = a + int(n * SPLIT[1])
    return text[:a], text[a:b], text[b:]


def prompt(name: str, text: str) -> str:
    """The seed's prompt for this corpus; for a shorter, user-given text, its first 256 characters."""
    start, end = PROMPTS[name]
    return text[start:end] if end <= len(text) else text[:256]
