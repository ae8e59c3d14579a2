"""Timing helpers for scripts/benchmark.py: a bandwidth probe, our decode, and
transformers' decode, each measured after warm-up."""

from __future__ import annotations

import os
import statistics
import time
from typing import List, Sequence, Tuple

import jax
import jax.numpy as jnp

from coreinfer_jax.generation import GenerationStats, Generator


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


def hf_model(model_path: str, hf_config: dict, dtype_name: str):
  """transformers' torch model for a checkpoint, or random in a shape."""
  import torch
  import transformers
  torch_dtype = getattr(torch, dtype_name)
  if model_path.startswith("random:"):
    config = transformers.AutoConfig.for_model(**hf_config)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype).eval()
  if os.path.isdir(model_path):
    return transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).eval()
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(model_path), gguf_file=os.path.basename(model_path), dtype=torch_dtype).eval()


def hf_decode_tokens_per_second(model, prompt_ids: List[int], decode_steps: int) -> float:
  """Decode rate of `generate` (KV cache, greedy): the time of 1 + N new
  tokens minus the time of 1 (prefill and first token), over N."""
  import torch

  def timed(n):
    ids = torch.tensor([prompt_ids])
    t0 = time.perf_counter()
    with torch.no_grad():
      model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                     do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0

  timed(2)   # warm-up
  return decode_steps / max(1e-9, timed(decode_steps + 1) - timed(1))
