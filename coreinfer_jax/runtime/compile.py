"""Ahead-of-time compilation, once per (function name, argument shapes), counted.

`CompiledFunctions` lowers and compiles each (name, argument shapes) once and
counts compilations and their seconds, so compile time is never hidden in a
throughput figure and tests can assert compile counts.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Callable, Dict, Tuple

import jax


def shape_key(args) -> Tuple:
  leaves, treedef = jax.tree_util.tree_flatten(args)
  return treedef, tuple((a.shape, a.dtype) for a in leaves)


class CompiledFunctions:
  """Executables by (function name, argument shapes)."""

  def __init__(self):
    self._executables: Dict[Tuple, Any] = {}
    self.compiles: collections.Counter = collections.Counter()
    self.compile_seconds: collections.Counter = collections.Counter()
    self.warm_up_seconds = 0.0   # first runs of new executables, compilation excluded

  def has(self, name: str, *args) -> bool:
    return (name, shape_key(args)) in self._executables

  def get(self, name: str, fn: Callable, *args, donate_argnums: Tuple[int, ...] = ()):
    """The executable for these argument shapes (arrays or ShapeDtypeStructs)."""
    key = (name, shape_key(args))
    executable = self._executables.get(key)
    if executable is None:
      t0 = time.perf_counter()
      # keep_unused: a donated argument that is only an output buffer must not be pruned.
      executable = jax.jit(fn, donate_argnums=donate_argnums, keep_unused=bool(donate_argnums)
                           ).lower(*args).compile()
      self.compile_seconds[name] += time.perf_counter() - t0
      self.compiles[name] += 1
      self._executables[key] = executable
    return executable

  def __call__(self, name: str, fn: Callable, *args, donate_argnums: Tuple[int, ...] = ()):
    return self.get(name, fn, *args, donate_argnums=donate_argnums)(*args)
