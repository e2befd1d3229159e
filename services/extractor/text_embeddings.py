"""CLIP text embeddings of concept sets, labels or free texts (`EmbedText`).

Texts are embedded raw (no prompt template) and stored as one .npz with `names` (C,) str
and `embeddings` (C, D) float32, L2-normalised, under
`keys.text_embeddings(clip key, content key of the texts)`: the same texts with the same
CLIP weights are embedded once.

Concept set files are read by `services.common.concept_set` (the gateway reads them
too, at submission); its reader and text checks are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from services.common import keys
from services.common.concept_set import check_texts as check_texts
from services.common.concept_set import read_concept_set as read_concept_set
from services.common.store import ObjectStore
from services.extractor.clip_models import ClipEncoder, ClipSource


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
