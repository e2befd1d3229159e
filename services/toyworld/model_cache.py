"""Trained toy models by content key: shipped with the package, else cached on disk.

`trained_weights` answers from the package's shipped weights (`shipped`) when they were
trained for the asked key, and otherwise from the training cache, training on a miss. A
cache entry is `{cache_dir}/toyworld/{name}-{key}.pt` (loadable with
`torch.load(weights_only=True)`) and `{name}-{key}.json` (what training reported). Both are
written atomically, so a crash never leaves a half-written entry; a lock file beside them
makes concurrent users of one key wait for a single training run. Training runs with
`TRAINING_THREADS` torch threads whatever the caller's setting: CPU kernels sum in an
order that depends on the thread count, and one key must name one set of weights.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from services.common.atomic_file import atomic_write
from services.common.file_lock import file_lock
from services.common.settings import Settings
from services.toyworld.shipped import shipped_path, shipped_record

StateDict = dict[str, torch.Tensor]
TRAINING_THREADS = 2


def cache_root(cache_dir: Path | None = None) -> Path:
    """The toy-model cache folder: `cache_dir`, else `NEURODISSECT_CACHE_DIR`, else ./var/cache."""
    base = Path(cache_dir) if cache_dir is not None else Path(Settings.load().cache_dir)
    return base / "toyworld"


def weights_path(name: str, key: str, cache_dir: Path | None = None) -> Path:
    """Where the state dict of `name` for `key` lies: shipped, else in the cache (maybe absent)."""
    return shipped_path(name, key) or cache_root(cache_dir) / f"{name}-{key}.pt"


def trained_weights(
    name: str,
    key: str,
    train: Callable[[], tuple[StateDict, dict[str, Any]]],
    cache_dir: Path | None = None,
) -> tuple[StateDict, dict[str, Any]]:
    """The state dict of `name` for `key` and its metrics: shipped, else cached or trained."""
    path = shipped_path(name, key)
    if path is not None:
        record = shipped_record(name)
        assert record is not None  # shipped_path found it
        return torch.load(path, map_location="cpu", weights_only=True), record["metrics"]
    return cached_weights(cache_root(cache_dir) / f"{name}-{key}.pt", train)


def cached_weights(
    path: Path, train: Callable[[], tuple[StateDict, dict[str, Any]]]
) -> tuple[StateDict, dict[str, Any]]:
    """The state dict at `path` and its metrics; if absent, `train` makes and stores them."""
    metrics_path = path.with_suffix(".json")
    with file_lock(path.with_suffix(".lock")):
        if path.is_file() and metrics_path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            return state, json.loads(metrics_path.read_text())
        with training_threads():
            state, metrics = train()
        atomic_write(path, lambda handle: torch.save(state, handle))
        text = json.dumps(metrics, sort_keys=True, indent=2) + "\n"
        atomic_write(metrics_path, lambda handle: handle.write(text.encode()))
    return state, metrics


@contextlib.contextmanager
def training_threads() -> Iterator[None]:
    """Run the body with `TRAINING_THREADS` torch threads, then restore the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(TRAINING_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)
