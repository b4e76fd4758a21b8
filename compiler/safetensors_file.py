"""Reading safetensors files one tensor at a time, bf16 included, with bounded memory.

The safetensors library's numpy backend has no bfloat16 and its torch backend would pull torch into
the compiler, so this module reads the format directly: an 8-byte header length, a JSON header with
each tensor's dtype, shape and byte range, then the data. Tensors are read with plain file reads
rather than a memory map, so pages of a large checkpoint do not accumulate in the process's RSS.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_ITEM_SIZE = {"F32": 4, "F16": 2, "BF16": 2}
_MAX_HEADER = 100 << 20


class SafetensorsFormatError(ValueError):
    """The file is not a complete, well-formed safetensors file."""


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor's dtype, shape and byte range; checks that all ranges lie inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise SafetensorsFormatError("file is shorter than its 8-byte header length")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > min(_MAX_HEADER, size - 8):
            raise SafetensorsFormatError(f"header length {header_length} does not fit in a file of {size} bytes")
        try:
            header = json.loads(handle.read(header_length))
        except ValueError as exc:
            raise SafetensorsFormatError(f"header is not JSON ({exc})") from None
    base = 8 + header_length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (base + int(offset) for offset in info["data_offsets"])
            entry = TensorEntry(str(info["dtype"]), tuple(int(d) for d in info["shape"]), start, end)
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFormatError(f"tensor {name}: malformed header entry") from None
        if end > size:
            raise SafetensorsFormatError(f"tensor {name} ends at byte {end}, past the end of the file ({size} bytes): the file is truncated")
        if entry.dtype in _ITEM_SIZE and end - start != _ITEM_SIZE[entry.dtype] * int(np.prod(entry.shape, dtype=np.int64)):
            raise SafetensorsFormatError(f"tensor {name}: byte range does not match dtype {entry.dtype} and shape {list(entry.shape)}")
        entries[name] = entry
    return entries


def read_tensor(path: Path, entry: TensorEntry) -> np.ndarray:
    """One tensor as float32 (bf16 and fp16 widened exactly)."""
    count = entry.end - entry.start
    buffer = bytearray(count)
    with open(path, "rb") as handle:
        handle.seek(entry.start)
        if handle.readinto(buffer) != count:
            raise SafetensorsFormatError("file ended while reading the tensor")
    if entry.dtype == "F32":
        array = np.frombuffer(buffer, dtype="<f4")
    elif entry.dtype == "F16":
        array = np.frombuffer(buffer, dtype="<f2").astype(np.float32)
    elif entry.dtype == "BF16":
        # bfloat16 is the upper half of a float32: shift the 16 bits into place.
        array = (np.frombuffer(buffer, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise SafetensorsFormatError(f"dtype {entry.dtype} is not supported; supported: {', '.join(_ITEM_SIZE)}")
    return array.reshape(entry.shape)
