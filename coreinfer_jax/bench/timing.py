"""Timing for scripts/benchmark.py: the machine's bandwidth probe and our
prefill and decode, each measured after warm-up, as one value per repeat or
round (`bench.rounds` reports them)."""

from __future__ import annotations

import time
from typing import List, Sequence, Tuple

import jax
import jax.numpy as jnp

from coreinfer_jax.runtime.generator import GenerationStats, Generator, timed


def probe_gb_per_s(total_bytes: int, dtype=jnp.float32, rows: int = 5632,
                   repeats: int = 10) -> List[float]:
  """The machine's weight-streaming rate, GB/s of each repeat: batch-1
  matrix-vector products over `[rows, D]` matrices contracted over their last
  axis (the model's own `[out, in]` layout) that together hold `total_bytes`,
  in one jitted function."""
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
  streamed_gb = count * rows * cols * itemsize / 1e9
  return [streamed_gb / timed(time.perf_counter, stream, mats, x)[1] for _ in range(repeats)]


def time_prefill_and_decode(gen: Generator, prompt_ids: Sequence[Sequence[int]],
                            decode_steps: int) -> Tuple[GenerationStats, float]:
  """(prefill stats, decode tokens/s per sequence) of one run, on `gen.clock`;
  the decode loop reads nothing back until its end, measuring the device's rate."""
  gen.compile_for(gen.params, len(prompt_ids), gen.bucket(prompt_ids, decode_steps + 1))
  stats = GenerationStats()
  state = gen.timed_prefill(prompt_ids, decode_steps + 1, stats)
  tokens, cache = state.tokens_B, state.cache
  t0 = gen.clock()
  if gen.verify:   # rounds read their accepted count back: each is timed whole
    for _ in gen.verified_tokens(state, decode_steps + 1, stats):
      pass
    gen.recycle(state)
    return stats, decode_steps / (gen.clock() - t0)
  for _ in range(decode_steps):
    tokens, cache = gen.decode(state.decode_params, cache, tokens)
  tokens.block_until_ready()
  gen.recycle(state)
  return stats, decode_steps / (gen.clock() - t0)
