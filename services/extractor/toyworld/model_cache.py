"""Trained toy models cached on disk under a content key: a plain state dict plus a metrics JSON.

A cache entry is `{cache_dir}/toyworld/{name}-{key}.pt` (loadable with
`torch.load(weights_only=True)`) and `{name}-{key}.json` (what training reported). Both are
written atomically, so a crash never leaves a half-written entry; a lock file beside them
makes concurrent users of one key wait for a single training run.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from services.common.file_lock import file_lock
from services.common.settings import Settings

StateDict = dict[str, torch.Tensor]


def cache_root(cache_dir: Path | None = None) -> Path:
    """The toy-model cache folder: `cache_dir`, else `NEURODISSECT_CACHE_DIR`, else ./var/cache."""
    base = Path(cache_dir) if cache_dir is not None else Path(Settings.load().cache_dir)
    return base / "toyworld"


def cached_weights(
    path: Path, train: Callable[[], tuple[StateDict, dict[str, Any]]]
) -> tuple[StateDict, dict[str, Any]]:
    """The state dict at `path` and its metrics; if absent, `train` makes and stores them."""
    metrics_path = path.with_suffix(".json")
    with file_lock(path.with_suffix(".lock")):
        if path.is_file() and metrics_path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            return state, json.loads(metrics_path.read_text())
        state, metrics = train()
        _atomic_write(path, lambda handle: torch.save(state, handle))
        text = json.dumps(metrics, sort_keys=True, indent=2) + "\n"
        _atomic_write(metrics_path, lambda handle: handle.write(text.encode()))
    return state, metrics


def _atomic_write(path: Path, write: Callable[[Any], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
