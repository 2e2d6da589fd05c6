"""The character vocabulary: the sorted set of a corpus's characters. It travels in every artifact."""
from __future__ import annotations

import numpy as np


class VocabError(ValueError):
    """A text holds a character the vocabulary does not know."""


class Vocab:
    def __init__(self, chars: str):
        if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise ValueError("vocabulary must be sorted unique characters")
        self.chars = chars
        self.index = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and other.chars == self.chars

    def __reduce__(self):
        return Vocab, (self.chars,)  # pickled as its characters (the server sends it with every stream)

    def encode(self, text: str) -> np.ndarray:
        """text -> int64 ids; a character outside the vocabulary is a VocabError naming it."""
        try:
            return np.fromiter((self.index[ch] for ch in text), dtype=np.int64, count=len(text))
        except KeyError as e:
            ch = e.args[0]
            raise VocabError(
                f"character {ch!r} at position {text.index(ch)} is not in the model's vocabulary "
                f"of {len(self)} characters"
            ) from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)
