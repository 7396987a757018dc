"""Reading and writing .safetensors files with NumPy only (no torch), bfloat16 included.

The reader memory-maps the file, so a tensor (or one shard of it) is read from disk only when it is
sliced; nothing holds a full host copy of a model. Files are untrusted input: the header's size,
dtypes, shapes and offsets are checked against the file before any data is touched.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

_MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A .safetensors file is malformed; the message names the file (and tensor)."""


class SafetensorsFile:
    """Lazy, validated view of one .safetensors file: `f[name]` is a read-only memmap view."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{self.path}: too short to be a safetensors file ({size} bytes).")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise SafetensorsError(f"{self.path}: header length {header_len} exceeds the file size {size}.")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{self.path}: header is not valid JSON ({e}).") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is not a JSON object.")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        self._entries = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: tensor {name!r} has a malformed header entry {info!r}.") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_len or end - begin != nbytes:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} (shape {shape}, {info['dtype']}) has offsets "
                    f"[{begin}, {end}) that do not fit its size or the file ({data_len} data bytes); "
                    "the file is truncated or corrupt.")
            self._entries[name] = (dtype, shape, begin)
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin = self._entries[name]
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape)


def _header(tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]], metadata) -> tuple[bytes, int]:
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    return raw, offset


def save_file(path: str | os.PathLike, tensors: Mapping[str, "callable | np.ndarray"], *,
              shapes: Mapping[str, tuple[int, ...]] | None = None,
              dtypes: Mapping[str, np.dtype] | None = None, metadata=None) -> None:
    """Writes tensors in order. A value may be an array or a zero-argument callable returning one,
    so a caller can fetch one tensor at a time from devices (then `shapes`/`dtypes` give the
    header up front). Written to a temporary name and renamed, so a crash leaves no half file."""
    def spec(name):
        value = tensors[name]
        if callable(value):
            return name, tuple(shapes[name]), np.dtype(dtypes[name])
        return name, tuple(np.shape(value)), np.asarray(value).dtype

    specs = [spec(n) for n in tensors]
    header, _ = _header(specs, metadata)
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name, shape, dtype in specs:
            value = tensors[name]
            array = np.ascontiguousarray(np.asarray(value() if callable(value) else value))
            if array.shape != shape or array.dtype != dtype:
                raise SafetensorsError(f"{path}: tensor {name!r} is {array.shape} {array.dtype}, "
                                       f"its header says {shape} {dtype}.")
            f.write(array.tobytes())
    os.replace(tmp, path)
