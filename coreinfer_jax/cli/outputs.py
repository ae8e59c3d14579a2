"""Output paths checked before any work starts.

A command that would fail to save its results after an hour of work must
fail in its first second instead: the path's folder must exist or be
creatable, must be a folder, and must be writable; a file output must not be
a folder, a folder output must not be a file.
"""

from __future__ import annotations

import os
from typing import Optional

from coreinfer_jax.analysis import plots


def _nearest_existing(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.lexists(path):
    path = os.path.dirname(path)
  return path


def _check_creatable(folder: str, target: str, flag: str) -> None:
  """`folder` (which will hold `target`) is a folder we can write in, or can be created."""
  existing = _nearest_existing(folder)
  if not os.path.isdir(existing):
    raise NotADirectoryError(f"{flag}: {existing} is a file, not a folder, so {target} cannot "
                             "be written")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise PermissionError(f"{flag}: cannot write in {existing}")


def check_file(path: Optional[str], flag: str) -> None:
  """A file the command will write (None: nothing to check)."""
  if not path:
    return
  if path.endswith(os.sep) or os.path.isdir(path):
    raise IsADirectoryError(f"{flag}: {path} names a folder; give a file path")
  if os.path.exists(path) and not os.access(path, os.W_OK):
    raise PermissionError(f"{flag}: {path} is not writable")
  _check_creatable(os.path.dirname(os.path.abspath(path)), path, flag)


def check_dir(path: Optional[str], flag: str) -> None:
  """A folder the command will write into (None: nothing to check)."""
  if not path:
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f"{flag}: {path} is a file; give a folder")
  _check_creatable(os.path.abspath(path), path, flag)


def check_plot(path: Optional[str], flag: str) -> None:
  """An image the command will write: a file whose extension names a format."""
  if not path:
    return
  check_file(path, flag)
  try:
    plots.image_format(path)
  except ValueError as e:
    raise ValueError(f"{flag}: {e}") from None


def markdown_path(markdown_out: Optional[str], json_out: str) -> str:
  """`--markdown_out`, or by default the JSON's path with .md."""
  return markdown_out or os.path.splitext(json_out)[0] + ".md"
