"""Hugging Face checkpoint folders: `config.json` and `*.safetensors` (one file
or shards) -> (config dict, Hugging Face-named lazy tensors).

Each file is opened once: the config is parsed, each shard's header is read
and its handle kept, and a tensor is read from that handle (as float32) only
when the converter takes it. A shard the safetensors library refuses is read
again by `_damage` only to say, in one line, what is wrong with it (the
library's own message names neither the file nor the tensor): the file cut
short (which tensor, its bytes present and expected), a header that is not
JSON or whose tensors' byte ranges do not match their shapes.
"""

from __future__ import annotations

import functools
import glob
import json
import math
import os
import struct
from typing import Any, Dict, Optional, Tuple

import numpy as np

from coreinfer_jax import files
from coreinfer_jax.checkpoint.convert import TensorGetter
from coreinfer_jax.checkpoint.errors import CheckpointError, refuse_truncated

_ADVICE = "re-download or re-save it"
_LENGTH_BYTES = 8   # the header's length, a little-endian u64, comes first
_MAX_HEADER_BYTES = 100_000_000   # the library's own limit
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_folder(folder: str) -> Tuple[Dict[str, Any], Dict[str, TensorGetter]]:
  config_path = os.path.join(folder, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
  config = files.read_json(config_path)
  if not isinstance(config, dict):
    raise files.InputFileError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
  return config, _tensors(folder)


def _tensors(folder: str) -> Dict[str, TensorGetter]:
  files_found = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if not files_found:
    raise FileNotFoundError(f"no *.safetensors files in {folder}")
  tensors: Dict[str, TensorGetter] = {}
  for f in files_found:
    handle = _open(f)   # closed when the last getter is dropped
    for name in handle.keys():
      if name in tensors:
        raise ValueError(f"tensor {name!r} appears in more than one shard of {folder}")
      tensors[name] = functools.partial(_read, handle, name)
  return tensors


def _open(path: str):
  from safetensors import SafetensorError, safe_open
  try:
    return safe_open(path, framework="flax")
  except SafetensorError as e:
    raise CheckpointError(f"safetensors file {path!r} is truncated or corrupt: "
                          f"{_damage(path) or e} ({_ADVICE})") from None


def _damage(path: str) -> Optional[str]:
  """What is wrong with the file's header, or None if this reading finds
  nothing; raises the one-line `CheckpointError` for a file cut short."""
  size = os.path.getsize(path)
  with open(path, "rb") as fh:
    head = fh.read(_LENGTH_BYTES)
    if len(head) < _LENGTH_BYTES:
      return f"{size} bytes, too few for the header's length"
    (length,) = struct.unpack("<Q", head)
    if length > _MAX_HEADER_BYTES:
      return f"its header claims {length} bytes, more than safetensors allows"
    if _LENGTH_BYTES + length > size:
      return f"its header claims {length} bytes, the file has {size}"
    raw = fh.read(length)
  try:
    header = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as e:
    return f"its header is not UTF-8 (byte {_LENGTH_BYTES + e.start})"
  except json.JSONDecodeError as e:
    return f"its header is not valid JSON at line {e.lineno} column {e.colno}: {e.msg}"
  if not isinstance(header, dict):
    return "its header is not a JSON object"
  entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
  start = _LENGTH_BYTES + length
  for name, entry in entries.items():
    problem = _entry_problem(entry)
    if problem:
      return f"tensor {name!r}: {problem}"
  refuse_truncated("safetensors", path, size,
                   [(name, start + e["data_offsets"][0], start + e["data_offsets"][1])
                    for name, e in entries.items()], _ADVICE)
  return None


def _entry_problem(entry: Any) -> Optional[str]:
  """Why a header's tensor entry cannot describe its bytes, or None."""
  if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
          and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
          and all(isinstance(v, int) and v >= 0 for v in entry["shape"] + entry["data_offsets"])):
    return f"entry {json.dumps(entry)[:200]} is not {{dtype, shape, data_offsets: [begin, end]}}"
  begin, end = entry["data_offsets"]
  itemsize = _DTYPE_BYTES.get(entry.get("dtype"))
  expected = None if itemsize is None else math.prod(entry["shape"]) * itemsize
  if expected is not None and end - begin != expected:
    return (f"data_offsets [{begin}, {end}] hold {end - begin} bytes, its shape {entry['shape']} "
            f"of {entry['dtype']} needs {expected}")
  return None


def _read(handle, name: str) -> np.ndarray:
  return np.asarray(handle.get_tensor(name).astype("float32"))
