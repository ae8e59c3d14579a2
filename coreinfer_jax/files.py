"""Files in and out.

Writes are atomic: a reader sees the old file or the new one, never half of
one. Reads of the text and JSON files users hand us raise `InputFileError`,
whose one line names the file and where it is wrong (JSON: line and column;
text: the byte offset of the first byte that is not UTF-8).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict

import numpy as np


class InputFileError(ValueError):
  """A file given as input cannot be read as what it should be."""


def read_text(path: str) -> str:
  """The file's text, decoded as UTF-8."""
  with open(path, "rb") as fh:
    data = fh.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise InputFileError(f"{path}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})"
                         ) from None


def read_json(path: str) -> Any:
  """The file's JSON value."""
  text = read_text(path)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise InputFileError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
                         ) from None


def write_atomically(path: str, write: Callable[[str], None], suffix: str = "") -> None:
  """Calls `write(temporary path)`, then renames the result to `path`."""
  tmp = f"{path}.tmp{os.getpid()}{suffix}"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as fh:
      fh.write(text)
  write_atomically(path, write)


def write_json(path: str, payload: Any) -> None:
  """Writes `payload` as indented JSON, atomically."""
  write_text(path, json.dumps(payload, indent=2))


def write_npz(path: str, arrays: Dict[str, np.ndarray]) -> None:
  """`np.savez` atomically (`path` ends in .npz)."""
  write_atomically(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")
