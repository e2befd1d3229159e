"""The array chunk format: `.npy` for one array, `.npz` for named arrays.

Bytes in, bytes out, so every object store backend stores arrays the same way.
Pickles are never allowed on read.
"""

from __future__ import annotations

import io

import numpy as np


def npy_bytes(array: np.ndarray) -> bytes:
    """Encode one array as .npy bytes."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def npy_array(data: bytes) -> np.ndarray:
    """Decode .npy bytes."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def npz_bytes(arrays: dict[str, np.ndarray], compress: bool = False) -> bytes:
    """Encode named arrays as .npz bytes."""
    buffer = io.BytesIO()
    if compress:
        np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    else:
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def npz_arrays(data: bytes) -> dict[str, np.ndarray]:
    """Decode .npz bytes into a dict of arrays."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}
