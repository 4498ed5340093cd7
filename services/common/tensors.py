"""numpy arrays <-> the Tensor messages of the embedder and index protos.

Both protos define Tensor{data, shape, dtype} with the same dtype numbers.
"""
from __future__ import annotations

import numpy as np

from .errors import InvalidArgument

_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f2")}
_CODES = {v: k for k, v in _DTYPES.items()}


def to_tensor(array: np.ndarray, tensor_cls):
    array = np.ascontiguousarray(array)
    dtype = array.dtype.newbyteorder("<")
    if dtype not in _CODES:
        array, dtype = array.astype("<f4"), np.dtype("<f4")
    return tensor_cls(data=array.astype(dtype, copy=False).tobytes(), shape=list(array.shape), dtype=_CODES[dtype])


def from_tensor(tensor) -> np.ndarray:
    """Decode a Tensor to float32, checking that its bytes match its shape."""
    dtype = _DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidArgument(f"unsupported tensor dtype {tensor.dtype}")
    shape = tuple(tensor.shape)
    if not shape or any(d <= 0 for d in shape):
        raise InvalidArgument(f"tensor shape {list(shape)} is empty or negative")
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise InvalidArgument(
            f"tensor of shape {list(shape)} needs {expected} bytes, got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(np.float32)
