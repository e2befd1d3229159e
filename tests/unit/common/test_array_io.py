"""Named arrays packed as one header and raw buffers round-trip as read-only views."""

from __future__ import annotations

import numpy as np

from services.common import array_io


def test_packed_arrays_round_trip_every_dtype_and_shape() -> None:
    arrays = {
        "int16": np.arange(-5, 7, dtype=np.int16).reshape(3, 4),
        "uint64": np.array([1, 2**63 + 5], dtype=np.uint64),
        "float32": np.linspace(0, 1, 7, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.int32),
        "scalar": np.array(9, dtype=np.int64),
        "strided": np.arange(20, dtype=np.int32)[::3],
    }
    back = array_io.packed_arrays(array_io.packed_bytes(arrays))
    assert list(back) == list(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape, name
        np.testing.assert_array_equal(back[name], array)
        assert not back[name].flags.writeable
