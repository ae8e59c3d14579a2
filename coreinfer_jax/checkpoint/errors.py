"""The two ways a checkpoint is refused, both `ValueError`s that name the problem."""

from typing import Sequence, Tuple


class UnsupportedConfigError(ValueError):
  """A checkpoint's config asks for something this library does not implement."""


class CheckpointError(ValueError):
  """A checkpoint's tensors do not match its config, or its files are damaged."""


def refuse_truncated(kind: str, path: str, size: int, spans: Sequence[Tuple[str, int, int]],
                     advice: str) -> None:
  """Raises `CheckpointError` when a tensor's bytes (`spans`: name, first and
  end byte in the file) run past the file's `size`. The one line names the
  file, both sizes and the first tensor cut, so a partial download or copy
  is told apart from a checkpoint that does not match its config."""
  cut = [span for span in spans if span[2] > size]
  if not cut:
    return
  name, start, end = min(cut, key=lambda span: span[1])
  need = max(span[2] for span in spans)
  raise CheckpointError(f"{kind} file {path!r} is truncated: {size} bytes, its tensors need {need} "
                        f"(tensor {name!r} has {max(0, size - start)} of its {end - start} bytes; "
                        f"{advice})")
