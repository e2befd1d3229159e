"""The array chunk format: `.npy` for one array, `.npz` (or `packed_bytes`) for named arrays.

Bytes in, bytes out, so every object store backend stores arrays the same way.
Pickles are never allowed on read.
"""

from __future__ import annotations

import io
import json

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


def packed_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Encode named arrays as one JSON header and their raw buffers, 64-byte aligned.

    For artefacts that many tasks read whole (`packed_arrays` decodes without copies,
    where .npz would check and copy every member).
    """
    header: dict[str, tuple[str, list[int], int]] = {}
    offset = 0
    for name, array in arrays.items():
        header[name] = (array.dtype.str, list(array.shape), offset)
        offset += -(-array.nbytes // 64) * 64
    text = json.dumps(header).encode()
    start = -(-(8 + len(text)) // 64) * 64
    out = bytearray(start + offset)
    out[:8] = len(text).to_bytes(8, "little")
    out[8 : 8 + len(text)] = text
    for name, array in arrays.items():
        at = start + header[name][2]
        out[at : at + array.nbytes] = np.ascontiguousarray(array).tobytes()
    return bytes(out)


def packed_arrays(data: bytes) -> dict[str, np.ndarray]:
    """Decode `packed_bytes`: read-only views into `data`."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    start = -(-(8 + size) // 64) * 64
    return {
        name: np.frombuffer(
            data, dtype=np.dtype(dtype), count=int(np.prod(shape)), offset=start + offset
        ).reshape(shape)
        for name, (dtype, shape, offset) in header.items()
    }
