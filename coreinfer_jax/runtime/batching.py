"""Static shapes for variable prompts: length buckets and left padding.

Prompts are left-padded to the smallest length bucket that fits, so that a
(batch, bucket, cache length) triple compiles its prefill once; every
sequence of a batch then writes its next token at the same cache slot.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def default_dtype():
  """float32 on CPU (bfloat16 matmuls are slow on XLA:CPU), bfloat16 elsewhere."""
  return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def resolve_dtype(name: str):
  """A compute dtype by name: "auto" (`default_dtype`) or one of `DTYPES`."""
  if name == "auto":
    return default_dtype()
  if name not in DTYPES:
    raise ValueError(f"dtype {name!r}: choose one of auto, {', '.join(DTYPES)}")
  return DTYPES[name]


def pick_bucket(prompt_len: int, max_new_tokens: int, cache_len: int, buckets: Sequence[int]) -> int:
  """Smallest bucket holding the prompt that leaves room for the new tokens."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
  if prompt_len < 1:
    raise ValueError("a prompt must have at least one token")
  room = cache_len - max_new_tokens
  if prompt_len > room:
    raise ValueError(
        f"prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} does not fit "
        f"the cache length {cache_len}")
  return min([b for b in buckets if prompt_len <= b <= room] or [room])


def left_pad(prompt_ids: Sequence[Sequence[int]], length: int) -> Tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [B, length], start int32 [B]) with each prompt right-aligned."""
  tokens = np.zeros((len(prompt_ids), length), np.int32)
  start = np.zeros((len(prompt_ids),), np.int32)
  for b, ids in enumerate(prompt_ids):
    tokens[b, length - len(ids):] = ids
    start[b] = length - len(ids)
  return tokens, start
