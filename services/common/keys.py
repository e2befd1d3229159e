"""The object store layout: every key the services read or write is built here.

```
jobs/{job_id}/job.json                                 spec + state + stage progress
jobs/by-idempotency/{sha}.json                         idempotency key -> job id
probe/{dataset_key}/concepts.json                      concept table (see probe_format)
probe/{dataset_key}/labels/i{i0}-{i1}.npz              label maps at mask resolution
probe/{dataset_key}/images/{size}/{image_id}.png       thumbnails materialized on demand
probe/{dataset_key}/split.json                         seeded 70/10/20 train/val/test split
probe/{dataset_key}/grid/{digest}.npz                  label masks on an activation grid
probe/{dataset_key}/decoded/{digest}/i{i0}-{i1}.bin    label sets decoded for a layer grid
acts/{acts_key}/{layer}/manifest.json                  shape, dtype, chunking, completion
acts/{acts_key}/{layer}/u{u0}-{u1}/i{i0}-{i1}.npy      (n, u1-u0, h, w) activations
acts/{acts_key}/{layer}/pooled/i{i0}-{i1}.npz          per-chunk spatial mean and max
acts/{acts_key}/{layer}/pooled.npz                     (N, U) mean and max, whole layer
occlusion/{occlusion_key}/{layer}.npz                  per-concept activation changes
heads/{model_key}/{layer}.npz                          classifier head reading a layer
probe/{dataset_key}/classes/{labels_key}.npy           (N,) class per probe image
embed/{dataset_key}/{clip_key}/images.npy              (N, D) CLIP image embeddings
embed/text/{clip_key}/{texts_key}.npz                  names (C,) + (C, D) CLIP text embeddings
embed/probs/{digest}/c{m0}-{m1}/i{i0}-{i1}.npy         P̃ = softmax(a·S) in image × concept pieces
results/{job_id}/{layer}/{method}/u{u0}-{u1}.json      one object per unit block
results/{job_id}/{layer}/{method}/summary.json         per-layer summary of one method
reports/{job_id}/...                                   static copy of the web UI's pages
renders/{digest}.png                                   overlays and plots, keyed by content
```

Layer names are module paths (`layer4`, `features.28`) and are used verbatim: they
contain only characters that are safe in keys (validated by the gateway).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

_RANGE = re.compile(r"^[ui](\d+)-(\d+)(?:\.\w+)?$")


def content_key(*parts: Any) -> str:
    """Return a short stable hash (24 hex chars) of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def file_digest(path: str, chunk_bytes: int = 1 << 20) -> str:
    """Return the sha256 hex digest of a file, read in bounded chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def span(prefix: str, start: int, stop: int) -> str:
    """Return the name of a half-open range, e.g. span('u', 0, 64) == 'u0-64'."""
    return f"{prefix}{start}-{stop}"


def parse_span(name: str) -> tuple[int, int]:
    """Parse 'u0-64' or 'i256-512.npy' into (start, stop)."""
    match = _RANGE.match(name.rsplit("/", 1)[-1])
    if not match:
        raise ValueError(f"not a range name: {name!r}")
    return int(match.group(1)), int(match.group(2))


def job(job_id: str) -> str:
    return f"jobs/{job_id}/job.json"


def jobs_prefix() -> str:
    return "jobs/"


def idempotency(key: str) -> str:
    return f"jobs/by-idempotency/{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def concepts(dataset_key: str) -> str:
    return f"probe/{dataset_key}/concepts.json"


def labels(dataset_key: str, i0: int, i1: int) -> str:
    return f"probe/{dataset_key}/labels/{span('i', i0, i1)}.npz"


def labels_prefix(dataset_key: str) -> str:
    return f"probe/{dataset_key}/labels/"


def thumbnail(dataset_key: str, image_id: int, size: int) -> str:
    return f"probe/{dataset_key}/images/{size}/{image_id}.png"


def split(dataset_key: str) -> str:
    return f"probe/{dataset_key}/split.json"


def grid_masks(dataset_key: str, digest: str) -> str:
    """Label masks on an activation grid; `digest`: `content_key` of grid, method, labels."""
    return f"probe/{dataset_key}/grid/{digest}.npz"


def decoded_labels(dataset_key: str, digest: str, i0: int, i1: int) -> str:
    """A label chunk decoded for a grid; `digest`: `content_key` of grid and categories."""
    return f"probe/{dataset_key}/decoded/{digest}/{span('i', i0, i1)}.bin"


def manifest(acts_key: str, layer: str) -> str:
    return f"acts/{acts_key}/{layer}/manifest.json"


def acts_chunk(acts_key: str, layer: str, u0: int, u1: int, i0: int, i1: int) -> str:
    return f"acts/{acts_key}/{layer}/{span('u', u0, u1)}/{span('i', i0, i1)}.npy"


def acts_layer_prefix(acts_key: str, layer: str) -> str:
    return f"acts/{acts_key}/{layer}/"


def pooled_chunk(acts_key: str, layer: str, i0: int, i1: int) -> str:
    return f"acts/{acts_key}/{layer}/pooled/{span('i', i0, i1)}.npz"


def pooled(acts_key: str, layer: str) -> str:
    return f"acts/{acts_key}/{layer}/pooled.npz"


def occlusion(occlusion_key: str, layer: str) -> str:
    return f"occlusion/{occlusion_key}/{layer}.npz"


def classifier_head(model_key: str, layer: str) -> str:
    return f"heads/{model_key}/{layer}.npz"


def classes(dataset_key: str, labels_key: str) -> str:
    return f"probe/{dataset_key}/classes/{labels_key}.npy"


def image_embeddings(dataset_key: str, clip_key: str) -> str:
    return f"embed/{dataset_key}/{clip_key}/images.npy"


def text_embeddings(clip_key: str, texts_key: str) -> str:
    return f"embed/text/{clip_key}/{texts_key}.npz"


def concept_probs(digest: str, m0: int, m1: int, i0: int, i1: int) -> str:
    """Concepts [m0, m1) of P̃ on images [i0, i1); `digest`: `content_key` of embeddings, a."""
    return f"embed/probs/{digest}/{span('c', m0, m1)}/{span('i', i0, i1)}.npy"


def result_block(job_id: str, layer: str, method: str, u0: int, u1: int) -> str:
    return f"results/{job_id}/{layer}/{method}/{span('u', u0, u1)}.json"


def result_sample(job_id: str, layer: str, method: str, u0: int, u1: int) -> str:
    return f"{result_samples_prefix(job_id, layer, method)}{span('u', u0, u1)}.npz"


def result_samples_prefix(job_id: str, layer: str, method: str) -> str:
    return f"results/{job_id}/{layer}/{method}/samples/"


def result_summary(job_id: str, layer: str, method: str) -> str:
    return f"results/{job_id}/{layer}/{method}/summary.json"


def results_prefix(job_id: str, layer: str | None = None, method: str | None = None) -> str:
    parts = ["results", job_id] + [p for p in (layer, method) if p is not None]
    return "/".join(parts) + "/"


def report(job_id: str, name: str) -> str:
    return f"reports/{job_id}/{name}"


def report_prefix(job_id: str) -> str:
    return f"reports/{job_id}/"


def rendered(digest: str) -> str:
    return f"renders/{digest}.png"
