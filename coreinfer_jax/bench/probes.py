"""The machine's memory limit, stated honestly: several probes, the highest wins.

A decode step streams its weights once, so its speed limit is the rate at
which this machine can read memory into arithmetic. No single probe states
it: XLA's batch-1 matrix-vector kernels may stream slower than the memory
can (`xla_matvec`, the pattern our decode runs), a plain reduction shows what
XLA reaches without a matrix layout (`xla_stream`), and another backend's
matrix-vector product shows what the machine allows with other kernels
(`numpy_matvec`, and `torch_matvec`, what transformers' Linear runs, when
torch is installed). Fractions of the limit are taken against the highest
median. Each probe reads `total_bytes` of float32 per repeat.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Callable, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from coreinfer_jax.bench import rounds
from coreinfer_jax.bench.timing import probe_gb_per_s

ROWS, COLS = 5632, 2048   # one FFN matrix of TinyLlama: [F, D] float32, 46 MB


def _matrices(total_bytes: int) -> List[np.ndarray]:
  count = max(1, total_bytes // (ROWS * COLS * 4))
  rng = np.random.default_rng(0)
  return [rng.standard_normal((ROWS, COLS), np.float32) for _ in range(count)]


def _rates(read_bytes: int, run: Callable[[], object], repeats: int) -> rounds.Figure:
  run()   # warm-up (compilation, first touch)
  seconds = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    seconds.append(time.perf_counter() - t0)
  return rounds.measured([read_bytes / s / 1e9 for s in seconds])


def xla_stream(total_bytes: int, repeats: int) -> rounds.Figure:
  """A jitted sum over `total_bytes` of float32: streaming without a matrix."""
  data = jnp.asarray(np.ones(total_bytes // 4, np.float32))
  total = jax.jit(jnp.sum)
  return _rates(data.nbytes, lambda: total(data).block_until_ready(), repeats)


def numpy_matvec(total_bytes: int, repeats: int) -> rounds.Figure:
  """`W @ x` over [F, D] matrices with NumPy's BLAS (threads as it chooses)."""
  mats = _matrices(total_bytes)
  x = np.ones(COLS, np.float32)
  return _rates(sum(m.nbytes for m in mats), lambda: [m @ x for m in mats], repeats)


def torch_matvec(total_bytes: int, repeats: int) -> rounds.Figure:
  """`W @ x` with torch, as transformers' Linear runs at batch 1."""
  import torch
  mats = [torch.from_numpy(m) for m in _matrices(total_bytes)]
  x = torch.ones(COLS)
  with torch.inference_mode():
    return _rates(sum(m.numel() * 4 for m in mats), lambda: [m @ x for m in mats], repeats)


def machine_limits(total_bytes: int, repeats: int = 7, dtype=jnp.float32) -> Dict[str, rounds.Figure]:
  """Every probe available here, GB/s per repeat, by name. The other
  backends' probes read host memory, so they count only where JAX computes
  on the host (the CPU backend)."""
  limits = {"xla_matvec": rounds.measured(probe_gb_per_s(total_bytes, dtype, repeats=repeats)),
            "xla_stream": xla_stream(total_bytes, repeats)}
  if jax.default_backend() == "cpu":
    limits["numpy_matvec"] = numpy_matvec(total_bytes, repeats)
    if importlib.util.find_spec("torch") is not None:
      limits["torch_matvec"] = torch_matvec(total_bytes, repeats)
  return limits


def highest(limits: Dict[str, rounds.Figure]) -> str:
  """The name of the probe with the highest median: the machine's limit."""
  return max(limits, key=lambda name: limits[name].value)


def describe(limits: Dict[str, rounds.Figure]) -> List[str]:
  """One line per probe (min/median/max GB/s), the limit's marked."""
  limit = highest(limits)
  return [f"  probe {rounds.describe(name, figure, 1, ' GB/s')}{'  <- the limit' if name == limit else ''}"
          for name, figure in limits.items()]
