"""Concept set files (CLIP-Dissect's vocabulary): one reader for the gateway and extractor.

A concept set file is UTF-8 text with one concept per line; LF, CRLF and CR-only line
endings are accepted, lines are stripped and blank lines dropped, so a blank line never
shifts the labels after it. The gateway reads it at submission, so an empty, unreadable
or oversized file is refused before any work starts; the extractor reads it again
when it embeds the concepts.
"""

from __future__ import annotations

import re
from pathlib import Path

from services.common.errors import InvalidArgument

MAX_TEXTS = 100_000
MAX_TEXT_CHARS = 1000
# A file with MAX_TEXTS concepts of MAX_TEXT_CHARS bytes fits, with line endings.
MAX_CONCEPT_SET_BYTES = MAX_TEXTS * (MAX_TEXT_CHARS + 2)


def read_concept_set(path: Path, field: str = "concept_set_uri") -> list[str]:
    """The concepts of a concept set file, in order, blank lines dropped, checked."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONCEPT_SET_BYTES + 1)
    except IsADirectoryError:
        raise InvalidArgument(f"{path} is a directory, not a concept set file", field) from None
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}", field=field) from None
    if len(raw) > MAX_CONCEPT_SET_BYTES:
        raise InvalidArgument(f"{path} is larger than {MAX_CONCEPT_SET_BYTES} bytes", field)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path} is not UTF-8 text: {exc}", field=field) from None
    names = [line.strip() for line in re.split(r"\r\n|\r|\n", text)]
    names = [name for name in names if name]
    if not names:
        raise InvalidArgument(f"{path} holds no concepts", field=field)
    check_texts(names, field)
    return names


def check_texts(texts: list[str], field: str = "texts") -> None:
    """InvalidArgument for too many texts, empty ones or overlong ones."""
    if len(texts) > MAX_TEXTS:
        raise InvalidArgument(f"{len(texts)} texts; at most {MAX_TEXTS}", field=field)
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidArgument("an empty text", field=f"{field}[{i}]")
        if len(text) > MAX_TEXT_CHARS:
            raise InvalidArgument(f"{len(text)} characters; at most {MAX_TEXT_CHARS}",
                                  field=f"{field}[{i}]")
