"""The two ways a checkpoint is refused, both `ValueError`s that name the problem."""


class UnsupportedConfigError(ValueError):
  """A checkpoint's config asks for something this library does not implement."""


class CheckpointError(ValueError):
  """A checkpoint's tensors do not match its config."""
