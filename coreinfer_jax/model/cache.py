"""Fixed-length KV cache, one array per layer.

Prompts are left-padded to a bucket, so every sequence of a batch writes its
next token at the same slot `length`; `start_B` is each sequence's first real
slot (the number of pad tokens), which masks padding and sets positions.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
from flax import struct

from coreinfer_jax.model.config import ModelConfig


@struct.dataclass
class KVCache:
  k: Tuple[jax.Array, ...]   # per layer [B, KVH, hd, S]: keys slot-minor (see layers.attend)
  v: Tuple[jax.Array, ...]   # per layer [B, KVH, S, hd]
  start_B: jax.Array         # int32 [B]: first real slot of each sequence
  length: jax.Array          # int32 []: slots written so far (next write slot)


def init_cache(config: ModelConfig, batch: int, max_len: int, start_B: jax.Array, dtype) -> KVCache:
  k_shape = (batch, config.num_kv_heads, config.head_dim, max_len)
  v_shape = (batch, config.num_kv_heads, max_len, config.head_dim)
  return KVCache(k=tuple(jnp.zeros(k_shape, dtype) for _ in range(config.num_layers)),
                 v=tuple(jnp.zeros(v_shape, dtype) for _ in range(config.num_layers)),
                 start_B=jnp.asarray(start_B, jnp.int32),
                 length=jnp.zeros((), jnp.int32))
