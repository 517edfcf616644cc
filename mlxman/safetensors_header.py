"""Read safetensors headers (names, dtypes, shapes, byte ranges) without touching tensor data, defensively."""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxman.files import FileProblem, open_regular

# safetensors itself refuses headers over 100 MB; anything larger is hostile or broken.
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


class HeaderError(ValueError):
    """A safetensors file whose header cannot be trusted; the message says why in plain words."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    header_bytes: int = 0

    @property
    def data_bytes(self) -> int:
        """Bytes the tensors occupy once loaded: the sum of their byte ranges."""
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def declared_size(self) -> int:
        """The file size the header implies: length field, header, and data up to the last tensor's end."""
        return 8 + self.header_bytes + max((t.end for t in self.tensors.values()), default=0)


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse and check a safetensors header (reading nothing past it); raise HeaderError if malformed."""
    path = Path(path)
    try:
        f, st = open_regular(path)
    except FileProblem as exc:
        raise HeaderError(str(exc)) from None
    file_size = st.st_size
    try:
        with f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise HeaderError(
                    f"{path.name} is truncated: {file_size} bytes, too short for a safetensors header"
                )
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise HeaderError(
                    f"{path.name} declares a {length}-byte header, over the {MAX_HEADER_BYTES}-byte limit"
                )
            if length > file_size - 8:
                raise HeaderError(
                    f"{path.name} declares a {length}-byte header but the file has only {file_size - 8} "
                    "bytes after its length field (truncated or not safetensors)"
                )
            raw = f.read(length)
    except OSError as exc:
        raise HeaderError(f"{path.name} cannot be read: {exc.strerror or exc}") from None
    return _parse(path, file_size, raw)


def load_tensors(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Every tensor of a safetensors file, evaluated, read through a descriptor opened without blocking and
    checked to be a regular file: a file swapped for a FIFO or a device after validation is refused, not
    waited on or read without end. HeaderError (a ValueError) when it cannot be read."""
    import mlx.core as mx

    path = Path(path)
    try:
        f, _ = open_regular(path)
    except FileProblem as exc:
        raise HeaderError(str(exc)) from None
    with f:
        # mx.load reads a path natively, ~2x faster than through a Python file; /dev/fd/N names the checked
        # descriptor's own file (the same inode), so nothing swapped in at the path is opened.
        fd_path = f"/dev/fd/{f.fileno()}"
        source: Any = fd_path if os.path.exists(fd_path) else f
        try:
            weights = mx.load(source, format="safetensors")
        except (OSError, RuntimeError, ValueError) as exc:
            raise HeaderError(f"{path.name} cannot be loaded: {exc}") from None
        if not isinstance(weights, dict):
            raise HeaderError(f"{path.name} holds no named tensors")
        mx.eval(list(weights.values()))  # while the file is still open
    return weights


def _parse(path: Path, file_size: int, raw: bytes) -> SafetensorsHeader:
    try:
        doc: Any = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise HeaderError(f"{path.name} has a header that is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise HeaderError(f"{path.name} has a header that is not a JSON object")
    data_size = file_size - 8 - len(raw)
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        if name == "__metadata__":
            if entry is None:  # mx.save_safetensors writes null when there is no metadata
                continue
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise HeaderError(f"{path.name}: __metadata__ must map strings to strings")
            metadata = dict(entry)
            continue
        tensors[name] = _tensor(path, name, entry, data_size)
    _check_overlaps(path, tensors)
    return SafetensorsHeader(
        path=path, file_size=file_size, tensors=tensors, metadata=metadata, header_bytes=len(raw)
    )


def _tensor(path: Path, name: str, entry: Any, data_size: int) -> TensorInfo:
    where = f"{path.name}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise HeaderError(f"{where} has no {{dtype, shape, data_offsets}} entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise HeaderError(f"{where} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise HeaderError(f"{where} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise HeaderError(f"{where} has invalid data_offsets {offsets!r}")
    start, end = offsets
    if not 0 <= start <= end <= data_size:
        raise HeaderError(
            f"{where} has byte range [{start}, {end}) outside the {data_size} data bytes of the file"
        )
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - start != expected:
        raise HeaderError(
            f"{where} spans {end - start} bytes but {dtype} {tuple(shape)} needs {expected} bytes"
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), start=start, end=end)


def _check_overlaps(path: Path, tensors: dict[str, TensorInfo]) -> None:
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_s1, e1, n1), (s2, _e2, n2) in itertools.pairwise(spans):
        if s2 < e1:
            raise HeaderError(f"{path.name}: tensors {n1!r} and {n2!r} overlap in the file")
