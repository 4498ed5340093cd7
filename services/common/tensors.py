"""numpy arrays <-> smily.types.v1.Tensor."""

from __future__ import annotations

import numpy as np

from smily.types.v1 import types_pb2

from .errors import InvalidArgument

_DTYPES: dict[types_pb2.DType, np.dtype] = {
    types_pb2.D_TYPE_FLOAT32: np.dtype("<f4"),
    types_pb2.D_TYPE_FLOAT16: np.dtype("<f2"),
}
_CODES = {v: k for k, v in _DTYPES.items()}


def to_tensor(array: np.ndarray) -> types_pb2.Tensor:
    array = np.ascontiguousarray(array)
    dtype = array.dtype.newbyteorder("<")
    if dtype not in _CODES:
        array, dtype = array.astype("<f4"), np.dtype("<f4")
    return types_pb2.Tensor(
        data=array.astype(dtype, copy=False).tobytes(), shape=list(array.shape), dtype=_CODES[dtype]
    )


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
        raise InvalidArgument(f"tensor of shape {list(shape)} needs {expected} bytes, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(np.float32)
