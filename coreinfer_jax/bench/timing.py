"""Timing for scripts/benchmark.py: the machine's bandwidth probe and our
prefill and decode, each measured after warm-up."""

from __future__ import annotations

import statistics
import time
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp

from coreinfer_jax.runtime.generator import GenerationStats, Generator


def probe_gb_per_s(total_bytes: int, dtype=jnp.float32, rows: int = 5632, repeats: int = 10) -> float:
  """The machine's weight-streaming rate: batch-1 matrix-vector products over
  per-array neuron-major `[rows, D]` matrices (the model's own layout) that
  together hold `total_bytes`, in one jitted function. Median GB/s."""
  itemsize = jnp.dtype(dtype).itemsize
  cols = 2048
  count = max(1, int(total_bytes // (rows * cols * itemsize)))
  key = jax.random.key(0)
  mats = [jax.random.normal(jax.random.fold_in(key, i), (rows, cols), dtype) for i in range(count)]
  x = jnp.ones((1, cols), dtype)

  @jax.jit
  def stream(mats, x):
    return sum(jnp.einsum("bd,fd->bf", x, m)[:, :8] for m in mats)

  jax.block_until_ready(stream(mats, x))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(stream(mats, x))
    times.append(time.perf_counter() - t0)
  return count * rows * cols * itemsize / statistics.median(times) / 1e9


def time_prefill_and_decode(gen: Generator, prompt_ids: Sequence[Sequence[int]],
                            decode_steps: int) -> Tuple[GenerationStats, float]:
  """(prefill stats, decode tokens/s per sequence) of one run; the decode loop
  reads nothing back until its end, measuring the device's rate."""
  gen.compile_for(gen.params, len(prompt_ids), gen.bucket(prompt_ids, decode_steps + 1))
  stats = GenerationStats()
  state = gen.timed_prefill(prompt_ids, decode_steps + 1, stats)
  tokens, cache = state.tokens_B, state.cache
  t0 = time.perf_counter()
  for _ in range(decode_steps):
    tokens, cache = gen.decode(state.decode_params, cache, tokens)
  tokens.block_until_ready()
  gen.recycle(state)
  return stats, decode_steps / (time.perf_counter() - t0)
