"""A GGUF file's header: its metadata and its tensor list, read in one pass without touching the weights.

gguf-py's ``GGUFReader`` reads the same, but builds a numpy view per array element: on a 262k-token vocabulary
(Gemma 3/4) that is about 40 seconds and two million objects. This reads the header as bytes (numeric arrays with
numpy, strings one by one) in well under a second. The layout is GGUF's (versions 2 and 3): magic, version, tensor
count, metadata count, the metadata key/value pairs, then each tensor's name, shape, type and offset.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

# GGUF metadata value types -> (struct format, numpy dtype) for the fixed-size ones; 8 string, 9 array
_SCALARS = {0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
            5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "<?"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"),
            12: ("<d", "<f8")}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    type_id: int          # a ggml type (gguf.GGMLQuantizationType)
    n_elements: int


@dataclass
class Header:
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)   # arrays as lists
    tensors: list[Tensor] = field(default_factory=list)


class _Bytes:
    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    def take(self, n: int) -> bytes:
        # a length past the end of the file (a corrupt or truncated header) is refused before anything is allocated
        if n > self.size - self.f.tell():
            raise ValueError("the file ends inside its header (truncated or corrupt?)")
        return self.f.read(n)

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item in _SCALARS:
                import numpy as np

                dtype = np.dtype(_SCALARS[item][1])
                return np.frombuffer(self.take(dtype.itemsize * count), dtype=dtype).tolist()
            return [self.value(item) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        return self.unpack(_SCALARS[kind][0])


def read(path: Path, *, tensors: bool = True) -> Header:
    """The header of the GGUF at ``path``. Raises ValueError for a file that is not a readable GGUF."""
    with open(path, "rb") as f:
        b = _Bytes(f, os.fstat(f.fileno()).st_size)
        if b.take(4) != b"GGUF":
            raise ValueError("no GGUF magic at the start of the file")
        version = b.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (this reads versions 2 and 3)")
        n_tensors, n_kv = b.unpack("<Q"), b.unpack("<Q")
        header = Header(version)
        for _ in range(n_kv):
            key = b.string()
            header.metadata[key] = b.value(b.unpack("<I"))
        if tensors:
            for _ in range(n_tensors):
                name = b.string()
                shape = tuple(b.unpack("<Q") for _ in range(b.unpack("<I")))
                type_id = b.unpack("<I")
                b.unpack("<Q")  # the data offset
                n = 1
                for d in shape:
                    n *= d
                header.tensors.append(Tensor(name, shape, type_id, n))
    return header
