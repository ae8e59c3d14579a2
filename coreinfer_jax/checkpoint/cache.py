"""The library's cache folder: `$XDG_CACHE_HOME/coreinfer_jax` (default
`~/.cache/coreinfer_jax`)."""

from __future__ import annotations

import os


def cache_dir(kind: str) -> str:
  """The cache folder of one kind of file (`models`, `tokenizers`); not created here."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "coreinfer_jax", kind)
