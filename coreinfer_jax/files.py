"""Files in and out.

Writes are atomic: a reader sees the old file or the new one, never half of
one. Reads of the text and JSON files users hand us raise `InputFileError`,
whose one line names the file and where it is wrong (JSON and JSON Lines:
line and column; CSV: line; text: the byte offset of the first byte that is
not UTF-8), never a bare decoder message that leaves the user to guess which
of several files it came from.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Callable, Dict, List

import numpy as np


class InputFileError(ValueError):
  """A file given as input cannot be read as what it should be."""


def read_text(path: str) -> str:
  """The file's text, decoded as UTF-8 (line ends kept as they are)."""
  with open(path, "rb") as fh:
    return decode_text(path, fh.read())


def decode_text(path: str, data: bytes) -> str:
  """`data`, the bytes read from `path` (e.g. decompressed), as UTF-8 text."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise InputFileError(f"{path}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})"
                         ) from None


def read_lines(path: str) -> List[str]:
  """The file's lines without their ends, split as Python's text mode splits
  them (at \\n, \\r\\n and \\r only: `str.splitlines` would also split at
  characters such as U+2028, which may lie inside a line's text)."""
  return [line.rstrip("\n") for line in io.StringIO(read_text(path), newline=None)]


def read_json(path: str) -> Any:
  """The file's JSON value."""
  try:
    return json.loads(read_text(path))
  except json.JSONDecodeError as e:
    raise _json_error(path, e.lineno, e) from None


def read_jsonl(path: str) -> List[Any]:
  """One JSON value per line that is not blank (JSON Lines)."""
  values = []
  for number, line in enumerate(read_lines(path), 1):
    if line.strip():
      try:
        values.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise _json_error(path, number, e) from None
  return values


def _json_error(path: str, line: int, e: json.JSONDecodeError) -> InputFileError:
  return InputFileError(f"{path}: invalid JSON at line {line} column {e.colno}: {e.msg}")


def read_csv(path: str) -> List[Dict[str, str]]:
  """The rows of a CSV file whose first row names the columns."""
  reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
  try:
    return list(reader)
  except csv.Error as e:
    raise InputFileError(f"{path}: invalid CSV at line {reader.line_num}: {e}") from None


def write_atomically(path: str, write: Callable[[str], None], suffix: str = "") -> None:
  """Calls `write(temporary path)`, then renames the result to `path`
  (creating `path`'s folder if needed)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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
