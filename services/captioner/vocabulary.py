"""The captioner's tokenizer and vocabulary.

Descriptions are lower-cased and split into words and punctuation marks, each mark
its own token (``"A red, round thing."`` → ``a red , round thing .``). A vocabulary
lists the special tokens first (pad, start, stop, unk, in that order, so their ids
are fixed) and then every word by decreasing frequency, ties alphabetically, so
the same descriptions always give the same ids.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from services.common.errors import FailedPrecondition, InvalidArgument

PAD = "<pad>"
START = "<start>"
STOP = "<stop>"
UNK = "<unk>"
SPECIAL_TOKENS = (PAD, START, STOP, UNK)

_TOKEN = re.compile(r"\w+|[^\w\s]")
_SPACE_BEFORE_PUNCTUATION = re.compile(r" ([.,;:!?])")


def tokenize(text: str) -> list[str]:
    """Split a description into lower-cased words and single punctuation marks."""
    return _TOKEN.findall(text.lower())


def detokenize(tokens: Sequence[str]) -> str:
    """Join tokens with spaces, attaching `.,;:!?` to the word before them."""
    return _SPACE_BEFORE_PUNCTUATION.sub(r"\1", " ".join(tokens))


class VocabularyMismatch(FailedPrecondition):
    """Two models that must share a vocabulary (decoder and language model) do not."""


@dataclass(frozen=True)
class Vocabulary:
    """Token ↔ id mapping; ids are positions in `tokens`, specials first."""

    tokens: tuple[str, ...]
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tokens[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise InvalidArgument(
                f"must start with the special tokens {list(SPECIAL_TOKENS)}", field="vocabulary"
            )
        if len(set(self.tokens)) != len(self.tokens):
            raise InvalidArgument("holds a token twice", field="vocabulary")
        object.__setattr__(self, "_ids", {token: i for i, token in enumerate(self.tokens)})

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> Vocabulary:
        """Build from raw descriptions, keeping words seen at least `min_count` times."""
        counts = Counter(token for text in texts for token in tokenize(text))
        words = sorted(
            (w for w, n in counts.items() if n >= min_count and w not in SPECIAL_TOKENS),
            key=lambda w: (-counts[w], w),
        )
        return cls((*SPECIAL_TOKENS, *words))

    @classmethod
    def from_list(cls, tokens: Sequence[str]) -> Vocabulary:
        """Rebuild from the list written by `to_list`."""
        return cls(tuple(tokens))

    def to_list(self) -> list[str]:
        """All tokens in id order (plain strings, safe for JSON and `weights_only` loads)."""
        return list(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def pad(self) -> int:
        """Id of the padding token."""
        return self._ids[PAD]

    @property
    def start(self) -> int:
        """Id of the start token."""
        return self._ids[START]

    @property
    def stop(self) -> int:
        """Id of the stop token."""
        return self._ids[STOP]

    @property
    def unk(self) -> int:
        """Id of the unknown-word token."""
        return self._ids[UNK]

    def encode(self, text: str) -> list[int]:
        """Ids of a description's tokens, unknown words as `unk`; no start or stop."""
        return [self._ids.get(token, self.unk) for token in tokenize(text)]

    def words(self, ids: Iterable[int]) -> list[str]:
        """Tokens of `ids` up to the first stop, without pad and start."""
        out: list[str] = []
        for i in ids:
            if i == self.stop:
                break
            if i not in (self.pad, self.start):
                out.append(self.tokens[i])
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to the first stop (see `words`)."""
        return detokenize(self.words(ids))

    def require_same(self, other: Vocabulary, what: str) -> None:
        """Raise `VocabularyMismatch` naming `what` unless `other` equals this vocabulary."""
        if self == other:
            return
        if len(self) != len(other):
            detail = f"{len(self)} tokens vs {len(other)}"
        else:
            i = next(
                i for i, (a, b) in enumerate(zip(self.tokens, other.tokens, strict=True)) if a != b
            )
            detail = f"token {i} is {self.tokens[i]!r} vs {other.tokens[i]!r}"
        raise VocabularyMismatch(f"vocabularies differ ({detail})", field=what)
