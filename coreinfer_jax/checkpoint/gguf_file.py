"""The GGUF container (llama.cpp's format, version 2 and 3, little-endian):
metadata and the table of tensors, read straight from the file.

`gguf.GGUFReader` builds numpy views for every part of every metadata value,
which takes 10-30 s on the 150k-260k token vocabularies of Qwen and Gemma;
parsing the same header with `struct` takes well under a second, so loading
needs no cache of the header. Tensor bytes are a read-only memory map,
dequantized by the `gguf` package only when a tensor is taken. A file that
ends before its header or its tensors' data does is refused in one line
before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any, Dict, List, Tuple

import numpy as np

from coreinfer_jax.checkpoint.errors import CheckpointError

_MAGIC = b"GGUF"
# Metadata value types: struct format of the scalars, then STRING = 8, ARRAY = 9.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


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


class _Cursor:
  """Reads little-endian values from a bytes buffer; IndexError past its end."""

  def __init__(self, buffer: bytes):
    self.buffer = buffer
    self.pos = 0

  def scalar(self, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    if self.pos + size > len(self.buffer):
      raise IndexError(f"the header ends at byte {len(self.buffer)}")
    (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
    self.pos += size
    return value

  def string(self) -> str:
    n = self.scalar("<Q")
    if self.pos + n > len(self.buffer):
      raise IndexError(f"the header ends at byte {len(self.buffer)}")
    text = self.buffer[self.pos:self.pos + n].decode("utf-8", errors="replace")
    self.pos += n
    return text

  def value(self, vtype: int) -> Any:
    if vtype in _SCALARS:
      return self.scalar(_SCALARS[vtype])
    if vtype == _STRING:
      return self.string()
    if vtype == _ARRAY:
      etype, count = self.scalar("<I"), self.scalar("<Q")
      if etype in _NUMPY:
        dtype = np.dtype(_NUMPY[etype])
        end = self.pos + count * dtype.itemsize
        if end > len(self.buffer):
          raise IndexError(f"the header ends at byte {len(self.buffer)}")
        array = np.frombuffer(self.buffer, dtype, count, self.pos)
        self.pos = end
        return array
      return [self.value(etype) for _ in range(count)]
    raise ValueError(f"unknown metadata value type {vtype}")


def _parse(path: str, buffer: bytes, size: int) -> GGUFFile:
  from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
  cur = _Cursor(buffer)
  version = cur.scalar("<I")
  if version not in (2, 3):
    raise ValueError(f"GGUF version {version} (only 2 and 3, little-endian, are read)")
  tensor_count, kv_count = cur.scalar("<Q"), cur.scalar("<Q")
  fields = {}
  for _ in range(kv_count):
    key = cur.string()
    fields[key] = cur.value(cur.scalar("<I"))
  infos = []
  for _ in range(tensor_count):
    name = cur.string()
    dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
    infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
  alignment = int(fields.get("general.alignment", 32))
  start = 4 + cur.pos
  start += -start % alignment
  tensors = []
  for name, dims, ggml_type, offset in infos:
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    tensors.append(TensorInfo(name, ggml_type, tuple(int(d) for d in reversed(dims)),
                              start + offset, int(np.prod(dims)) * type_size // block))
  need = max((t.offset + t.num_bytes for t in tensors), default=start)
  if need > size:
    raise CheckpointError(f"GGUF file {path!r} is truncated: {size} bytes, its tensors need "
                          f"{need} (re-download or re-assemble it)")
  return GGUFFile(path, fields, tensors)


def open_gguf(path: str) -> GGUFFile:
  """The file's metadata and tensor table; one-line `CheckpointError` on a
  truncated or malformed file."""
  size = os.path.getsize(path)
  with open(path, "rb") as fh:
    magic = fh.read(4)
    if magic != _MAGIC:
      raise CheckpointError(f"GGUF file {path!r} is not a valid GGUF file: GGUF magic invalid "
                            f"({size} bytes; re-download or re-assemble it)")
    # The header is read in growing pieces: it is a few MB even for big vocabularies.
    chunk = 1 << 24
    while True:
      fh.seek(4)
      buffer = fh.read(chunk)
      try:
        return _parse(path, buffer, size)
      except CheckpointError:
        raise
      except IndexError as e:
        if len(buffer) < chunk:   # the whole file was read: it ends inside its header
          raise CheckpointError(f"GGUF file {path!r} is truncated or corrupt: {e} ({size} bytes; "
                                "re-download or re-assemble it)") from None
        chunk *= 4
      except (ValueError, KeyError, UnicodeDecodeError, struct.error) as e:
        raise CheckpointError(f"GGUF file {path!r} is truncated or corrupt: {e} ({size} bytes; "
                              "re-download or re-assemble it)") from None
