"""CLIP text embeddings of concept sets, labels or free texts (`EmbedText`).

Texts are embedded raw (no prompt template) and stored as one .npz with `names` (C,) str
and `embeddings` (C, D) float32, L2-normalised, under
`keys.text_embeddings(clip key, content key of the texts)`: the same texts with the same
CLIP weights are embedded once.

A concept set file is UTF-8 text with one concept per line; LF, CRLF and CR-only line
endings are accepted, lines are stripped and blank lines dropped, so a blank line never
shifts the labels after it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from services.common import keys
from services.common.errors import InvalidArgument
from services.common.store import ObjectStore
from services.extractor.clip_models import ClipEncoder, ClipSource

MAX_TEXTS = 100_000
MAX_TEXT_CHARS = 1000


def read_concept_set(path: Path, field: str = "concept_set_uri") -> list[str]:
    """The concepts of a concept set file, in order, blank lines dropped."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path} is not UTF-8 text: {exc}", field=field) from None
    except IsADirectoryError:
        raise InvalidArgument(f"{path} is a directory, not a concept set file", field) from None
    names = [line.strip() for line in re.split(r"\r\n|\r|\n", text)]
    names = [name for name in names if name]
    if not names:
        raise InvalidArgument(f"{path} holds no concepts", field=field)
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


def embed_texts(
    store: ObjectStore,
    clip: ClipSource,
    names: list[str],
    load: Callable[[ClipSource], ClipEncoder] = ClipSource.load,
) -> str:
    """Embed `names` with `clip` unless already stored; return the object key.

    `load` builds the encoder only when needed (the servicer passes a cached loader).
    """
    key = keys.text_embeddings(clip.key, keys.content_key("texts", names))
    if store.exists(key):
        return key
    encoder = load(clip)
    embeddings = encoder.encode_texts(names).astype(np.float32)
    store.put_arrays(key, {"names": np.array(names, dtype=str), "embeddings": embeddings})
    return key
