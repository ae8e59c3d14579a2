"""The GGUF container (llama.cpp's format, version 2 and 3, little-endian):
metadata and the table of tensors, read straight from the file.

`gguf.GGUFReader` builds numpy views for every part of every metadata value,
which takes 10-30 s on the 150k-260k token vocabularies of Qwen and Gemma;
parsing the same header with `struct` takes well under a second, so loading
needs no cache of the header. Tensor bytes are a read-only memory map,
dequantized by the `gguf` package only when a tensor is taken. A file that
ends before its header or its tensors' data does, or whose header cannot be
right (garbage counts or lengths, unknown types, rows that are not whole
quantization blocks), is refused in one line naming the file and what is
wrong (the metadata key or tensor being read; for a cut tensor, its bytes
present and expected) before any tensor is read: never a struct or numpy
error from deep inside a load.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from typing import Any, Dict, List, Tuple

import numpy as np

from coreinfer_jax.checkpoint.errors import CheckpointError, refuse_truncated

_MAGIC = b"GGUF"
# Metadata value types: struct format of the scalars, then STRING = 8, ARRAY = 9.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4   # ggml's GGML_MAX_DIMS


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str
  ggml_type: int
  shape: Tuple[int, ...]       # row-major (numpy order: GGUF's dims reversed)
  offset: int                  # absolute byte offset of the data
  num_bytes: int


@dataclasses.dataclass
class GGUFFile:
  path: str
  fields: Dict[str, Any]       # metadata: Python scalars, str, lists (string arrays), numpy arrays
  tensors: List[TensorInfo]

  def field(self, key: str, default: Any = None) -> Any:
    value = self.fields.get(key)
    return default if value is None else value

  def read(self, tensor: TensorInfo) -> np.ndarray:
    """The tensor dequantized to float32, in its row-major shape."""
    from gguf import GGMLQuantizationType, quants
    qtype = GGMLQuantizationType(tensor.ggml_type)
    data = np.memmap(self.path, np.uint8, "r", offset=tensor.offset, shape=(tensor.num_bytes,))
    rows = int(np.prod(tensor.shape[:-1]))
    values = quants.dequantize(np.asarray(data).reshape(rows, -1), qtype)
    return values.astype(np.float32).reshape(tensor.shape)


_ADVICE = "re-download or re-assemble it"
# The fewest bytes a metadata entry (key length, type, a one-byte value) and a
# tensor's entry (name length, dimension count, type, offset) take.
_MIN_ENTRY_BYTES = {"metadata": 13, "tensors": 24}


class _NeedMore(Exception):
  """The bytes read so far end inside the header, before `end`."""

  def __init__(self, end: int):
    super().__init__(end)
    self.end = end


class _Corrupt(Exception):
  """The header cannot be what the file claims (the message says why)."""


class _Cursor:
  """Reads little-endian values from the first bytes after the magic.

  `limit` is how many bytes follow the magic in the whole file: a value that
  would run past it is `_Corrupt` (the file is cut or a length is garbage),
  one that only runs past the bytes read so far is `_NeedMore`. `reading`
  names what is being read, for those messages.
  """

  def __init__(self, buffer: bytes, limit: int):
    self.buffer = buffer
    self.limit = limit
    self.pos = 0
    self.reading = "the header's counts"

  def _take(self, n: int) -> int:
    """Moves past n bytes; returns where they start."""
    end = self.pos + n
    if end > self.limit:
      raise _Corrupt(f"the file ends inside its header, in {self.reading}")
    if end > len(self.buffer):
      raise _NeedMore(end)
    start, self.pos = self.pos, end
    return start

  def scalar(self, fmt: str) -> Any:
    (value,) = struct.unpack_from(fmt, self.buffer, self._take(struct.calcsize(fmt)))
    return value

  def count(self, what: str, min_bytes_each: int) -> int:
    """A u64 count of entries, refused when they could not fit in the file
    (a garbage count would otherwise loop through the whole file)."""
    n = self.scalar("<Q")
    if n * min_bytes_each > self.limit - self.pos:
      raise _Corrupt(f"{self.reading}: {n} {what} cannot fit in the file")
    return n

  def string(self) -> str:
    n = self.scalar("<Q")
    start = self._take(n)
    return self.buffer[start:start + n].decode("utf-8", errors="replace")

  def value(self, vtype: int) -> Any:
    if vtype in _SCALARS:
      return self.scalar(_SCALARS[vtype])
    if vtype == _STRING:
      return self.string()
    if vtype == _ARRAY:
      etype = self.scalar("<I")
      if etype in _NUMPY:
        dtype = np.dtype(_NUMPY[etype])
        count = self.count("array values", dtype.itemsize)
        return np.frombuffer(self.buffer, dtype, count, self._take(count * dtype.itemsize))
      count = self.count("array values", 8)   # a string's length or an array's header
      return [self.value(etype) for _ in range(count)]
    raise _Corrupt(f"{self.reading}: unknown value type {vtype}")


def _parse(path: str, buffer: bytes, size: int) -> GGUFFile:
  cur = _Cursor(buffer, size - len(_MAGIC))
  version = cur.scalar("<I")
  if version not in (2, 3):
    raise _Corrupt(f"GGUF version {version} (only 2 and 3, little-endian, are read)")
  tensor_count = cur.count("tensors", _MIN_ENTRY_BYTES["tensors"])
  kv_count = cur.count("metadata entries", _MIN_ENTRY_BYTES["metadata"])
  fields = {}
  for i in range(kv_count):
    cur.reading = f"metadata entry {i + 1} of {kv_count}"
    key = cur.string()
    cur.reading = f"metadata {key!r}"
    fields[key] = cur.value(cur.scalar("<I"))
  infos = []
  for i in range(tensor_count):
    cur.reading = f"tensor entry {i + 1} of {tensor_count}"
    name = cur.string()
    cur.reading = f"tensor {name!r}"
    num_dims = cur.scalar("<I")
    if num_dims > _MAX_DIMS:
      raise _Corrupt(f"tensor {name!r}: {num_dims} dimensions (ggml has at most {_MAX_DIMS})")
    dims = [cur.scalar("<Q") for _ in range(num_dims)]
    infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
  start = len(_MAGIC) + cur.pos
  start += -start % _alignment(fields)
  tensors = [_tensor_info(name, dims, ggml_type, start + offset)
             for name, dims, ggml_type, offset in infos]
  refuse_truncated("GGUF", path, size, [(t.name, t.offset, t.offset + t.num_bytes) for t in tensors],
                   _ADVICE)
  return GGUFFile(path, fields, tensors)


def _alignment(fields: Dict[str, Any]) -> int:
  alignment = fields.get("general.alignment", 32)
  if not isinstance(alignment, int) or alignment < 1:
    raise _Corrupt(f"metadata 'general.alignment' is {alignment!r}, not a positive integer")
  return alignment


def _tensor_info(name: str, dims: List[int], ggml_type: int, offset: int) -> TensorInfo:
  """The tensor's entry, refused when its type is unknown or its rows are not
  whole blocks of that type (its bytes could not be dequantized)."""
  from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
  try:
    qtype = GGMLQuantizationType(ggml_type)
  except ValueError:
    raise _Corrupt(f"tensor {name!r}: unknown ggml type {ggml_type}") from None
  block, type_size = GGML_QUANT_SIZES[qtype]
  row = dims[0] if dims else 1
  if row % block:
    raise _Corrupt(f"tensor {name!r}: rows of {row} values are not whole {qtype.name} blocks "
                   f"of {block}")
  return TensorInfo(name, ggml_type, tuple(int(d) for d in reversed(dims)), offset,
                    math.prod(dims) * type_size // block)


def open_gguf(path: str) -> GGUFFile:
  """The file's metadata and tensor table; one-line `CheckpointError` on a
  truncated or malformed file."""
  size = os.path.getsize(path)
  with open(path, "rb") as fh:
    magic = fh.read(len(_MAGIC))
    if magic != _MAGIC:
      raise CheckpointError(f"GGUF file {path!r} is not a valid GGUF file: GGUF magic invalid "
                            f"({size} bytes; {_ADVICE})")
    # The header is read in growing pieces: it is a few MB even for big vocabularies.
    chunk = 1 << 24
    while True:
      fh.seek(len(_MAGIC))
      buffer = fh.read(chunk)
      try:
        return _parse(path, buffer, size)
      except _NeedMore as e:
        chunk = max(4 * chunk, e.end)
      except _Corrupt as e:
        raise CheckpointError(f"GGUF file {path!r} is truncated or corrupt: {e} ({size} bytes; "
                              f"{_ADVICE})") from None
