"""The safetensors framing of an adapter file, checked strictly before any tensor is built.

Layout: an 8-byte little-endian header length n, n bytes of JSON header, then the tensor bytes.
The header maps each tensor name to ``{"dtype": str, "shape": [int >= 0, ...], "data_offsets":
[start, end]}`` (plus an optional ``"__metadata__"`` object of strings). Every rule the format
states is enforced here, so a malformed file is refused with AdapterFormatError (INVALID_ARGUMENT)
naming the tensor, never an exception from deep inside torch: integer, non-negative shapes (no
fractions, no bools, at most :data:`MAX_DIMS` dims), integer offsets, byte counts that equal the
shape times the dtype size, and tensors that tile the data area exactly, in order, without gaps or
overlaps. A deeply nested header fails as "unreadable header" (json's RecursionError is caught).

Thread: any (registration runs on a worker thread).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from server.adapters.config_fields import is_int
from server.adapters.errors import AdapterFormatError

WEIGHTS_NAME = "adapter_model.safetensors"
MAX_HEADER_BYTES = 8 << 20  # the JSON header; also the slack on top of the tensor bytes
MAX_DIMS = 8

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
OTHER_DTYPES = {"I64": "torch.int64", "I32": "torch.int32", "I16": "torch.int16", "I8": "torch.int8",
                "U8": "torch.uint8", "BOOL": "torch.bool"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file: its bytes are data[start:end] of the data area (after the header)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def name_shown(name: str) -> str:
    return name[:120]


def read_header(data: memoryview) -> tuple[int, list[TensorEntry]]:
    """(offset of the data area, tensor entries in file order); AdapterFormatError when malformed."""
    if len(data) < 8:
        raise AdapterFormatError(f"{WEIGHTS_NAME} is truncated ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > MAX_HEADER_BYTES:
        raise AdapterFormatError(f"{WEIGHTS_NAME} is truncated or corrupt: header length {n} "
                                 f"but the file has {len(data)} bytes")
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise AdapterFormatError(f"{WEIGHTS_NAME} is corrupt: unreadable header") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{WEIGHTS_NAME} is corrupt: the header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterFormatError(f"{WEIGHTS_NAME} is corrupt: __metadata__ must map strings to strings")
    entries = [_entry(name, info) for name, info in header.items() if name != "__metadata__"]
    body = len(data) - 8 - n
    expected = 0
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        if e.start != expected:
            what = "overlaps the previous tensor" if e.start < expected else "leaves a gap before it"
            raise AdapterFormatError(f"{WEIGHTS_NAME} is corrupt: tensor {name_shown(e.name)} {what} "
                                     f"(data_offsets start at {e.start}, expected {expected})")
        expected = e.end
    if expected != body:
        raise AdapterFormatError(f"{WEIGHTS_NAME} is truncated or corrupt: the header describes "
                                 f"{expected} bytes of tensor data, the file holds {body}")
    return 8 + n, entries


def _entry(name: str, info: object) -> TensorEntry:
    shown = name_shown(name)
    if not isinstance(info, dict):
        raise AdapterFormatError(f"{WEIGHTS_NAME} is corrupt: bad entry for {shown}")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype_name in OTHER_DTYPES:
        raise AdapterFormatError(f"tensor {shown} has dtype {OTHER_DTYPES[dtype_name]}; adapters hold floating point")
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise AdapterFormatError(f"{WEIGHTS_NAME} is corrupt: tensor {shown} has an unknown dtype")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(is_int(d) and d >= 0 for d in shape)):
        raise AdapterFormatError(f"{WEIGHTS_NAME} is corrupt: tensor {shown} has a bad shape "
                                 f"(at most {MAX_DIMS} integers >= 0)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise AdapterFormatError(f"{WEIGHTS_NAME} is corrupt: tensor {shown} has bad data_offsets "
                                 "(two integers, 0 <= start <= end)")
    count = 1
    for d in shape:
        count *= d
    start, end = offsets
    if end - start != count * dtype.itemsize:
        raise AdapterFormatError(f"{WEIGHTS_NAME} is corrupt: {shown} does not fit its bytes "
                                 f"(shape {shape} needs {count * dtype.itemsize}, data_offsets give {end - start})")
    return TensorEntry(name, dtype, tuple(shape), start, end)
