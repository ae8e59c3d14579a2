"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from typing import Any, Dict

import numpy as np


def write_json(path: str, payload: Any) -> None:
  """Writes `payload` as indented JSON to a temporary name, then renames it."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as fh:
    json.dump(payload, fh, indent=2)
  os.replace(tmp, path)


def write_npz(path: str, arrays: Dict[str, np.ndarray]) -> None:
  """`np.savez` to a temporary name, then renamed to `path` (which ends in .npz)."""
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
