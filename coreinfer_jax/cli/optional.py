"""Optional dependencies: found at start, or one line naming the pip command."""

from __future__ import annotations

import dataclasses
import importlib.util


class MissingDependencyError(RuntimeError):
  """An optional package a flag needs is not installed."""


@dataclasses.dataclass(frozen=True)
class Requirement:
  flag: str      # the flag that needs the module when it is set
  module: str    # import name
  pip: str       # what to install


TORCH = "torch==2.13.0"


def require(requirement: Requirement) -> None:
  """Raises `MissingDependencyError` unless `requirement.module` is importable
  (found without importing it)."""
  if importlib.util.find_spec(requirement.module) is None:
    raise MissingDependencyError(
        f"--{requirement.flag} needs the {requirement.module} package, which is not installed: "
        f"pip install {requirement.pip}")
