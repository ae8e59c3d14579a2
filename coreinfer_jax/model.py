"""The decoder forward pass as one pure function over a chunk of tokens.

`forward` writes the chunk's keys and values into the cache at slot
`cache.length` and returns logits; prefill is a chunk written at slot 0,
decoding is a chunk of one token. The same function serves both, so the
cached step-by-step path cannot drift from the full forward pass.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from coreinfer_jax import layers
from coreinfer_jax.cache import KVCache
from coreinfer_jax.config import ModelConfig
from coreinfer_jax.params import LayerParams, ModelParams


def positions(cache: KVCache, num_tokens: int) -> jax.Array:
  """Position ids [B, T] of the next chunk: slots counted from each sequence's
  first real slot (pad slots get position 0)."""
  slots = cache.length + jnp.arange(num_tokens, dtype=jnp.int32)
  return jnp.maximum(slots[None, :] - cache.start_B[:, None], 0)


def embed(params: ModelParams, config: ModelConfig, tokens_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
  x = params.embed_VE[tokens_BT]
  if params.project_in_DE is not None:
    x = layers.linear(x, params.project_in_DE)
  if params.positions_PD is not None:
    x = x + params.positions_PD[positions_BT + config.position_offset]
  return x


# (layer index, FFN neuron values [B, T, F], real-token mask [B, T]) ->
# that layer's core neurons int32 [B, k], or None for a dense layer.
CoreSelector = Callable[[int, jax.Array, jax.Array], Optional[jax.Array]]


def layer_forward(p: LayerParams, config: ModelConfig, x_BTD: jax.Array, positions_BT: jax.Array,
                  k_cache: jax.Array, v_cache: jax.Array, write_slot: jax.Array, start_B: jax.Array,
                  select_core: Optional[Callable] = None, keep_BF: Optional[jax.Array] = None):
  """One decoder block. Returns (x, k_cache, v_cache, core neurons or None);
  `select_core(values [B, T, F]) -> [B, k]` sees the FFN's neuron values;
  `keep_BF` (float [B, F], 1 keep / 0 drop) drops each sequence's other
  neurons (h[i] = 0), the dense-shaped equivalent of a gathered FFN."""
  eps = config.norm_eps
  attn_in = layers.norm(p.attn_norm, x_BTD, eps) if config.pre_norm else x_BTD
  attn_out, k_cache, v_cache = layers.attention(
      p.attn, config, attn_in, positions_BT, k_cache, v_cache, write_slot, start_B)
  x_BTD = x_BTD + attn_out
  if not config.pre_norm:
    x_BTD = layers.norm(p.attn_norm, x_BTD, eps)
  ffn_in = layers.norm(p.ffn_norm, x_BTD, eps) if config.pre_norm else x_BTD
  values_BTF = layers.ffn_neuron_values(p.ffn, ffn_in)
  core = select_core(values_BTF) if select_core else None
  h_BTF = layers.ffn_activations(p.ffn, values_BTF)
  if keep_BF is not None:
    h_BTF = h_BTF * keep_BF[:, None, :].astype(h_BTF.dtype)
  x_BTD = x_BTD + layers.ffn_output(p.ffn, h_BTF)
  if not config.pre_norm:
    x_BTD = layers.norm(p.ffn_norm, x_BTD, eps)
  return x_BTD, k_cache, v_cache, core


def logits(params: ModelParams, config: ModelConfig, x_BTD: jax.Array) -> jax.Array:
  if params.final_norm is not None:
    x_BTD = layers.norm(params.final_norm, x_BTD, config.norm_eps)
  if params.project_out_ED is not None:
    x_BTD = layers.linear(x_BTD, params.project_out_ED)
  return jnp.einsum("bte,ve->btv", x_BTD, params.output_embedding,
                    preferred_element_type=jnp.float32)


def forward_with_core(params: ModelParams, config: ModelConfig, cache: KVCache, tokens_BT: jax.Array,
                      select_core: Optional[CoreSelector], last_only: bool = False,
                      ffn_keep: Optional[Tuple[Optional[jax.Array], ...]] = None,
                      ) -> Tuple[jax.Array, KVCache, Tuple[Optional[jax.Array], ...]]:
  """Runs a chunk of tokens [B, T] at slots [cache.length, cache.length + T).

  Returns (float32 logits [B, T, V], or [B, 1, V] with `last_only`; the cache
  with the chunk written; per layer, `select_core`'s core neurons or None).
  The selector sees each layer's FFN values inside this one pass, so the
  prefill chooses core neurons with no hooks and no second pass. `ffn_keep`
  (per layer float [B, F] or None) masks each sequence's FFN neurons.
  Python-unrolled over layers (GUIDE §2).
  """
  T = tokens_BT.shape[1]
  pos_BT = positions(cache, T)
  real_BT = (cache.length + jnp.arange(T, dtype=jnp.int32))[None, :] >= cache.start_B[:, None]
  x = embed(params, config, tokens_BT, pos_BT)
  new_k, new_v, core = [], [], []
  for i, (p, k_cache, v_cache) in enumerate(zip(params.layers, cache.k, cache.v)):
    select = (lambda values, i=i: select_core(i, values, real_BT)) if select_core else None
    x, k_cache, v_cache, layer_core = layer_forward(
        p, config, x, pos_BT, k_cache, v_cache, cache.length, cache.start_B, select,
        None if ffn_keep is None else ffn_keep[i])
    new_k.append(k_cache)
    new_v.append(v_cache)
    core.append(layer_core)
  if last_only:
    x = x[:, -1:]
  cache = cache.replace(k=tuple(new_k), v=tuple(new_v), length=cache.length + T)
  return logits(params, config, x), cache, tuple(core)


def forward(params: ModelParams, config: ModelConfig, cache: KVCache, tokens_BT: jax.Array,
            last_only: bool = False, ffn_keep: Optional[Tuple[Optional[jax.Array], ...]] = None,
            ) -> Tuple[jax.Array, KVCache]:
  """`forward_with_core` without selection: (logits, cache)."""
  logits_BTV, cache, _ = forward_with_core(params, config, cache, tokens_BT, None, last_only,
                                           ffn_keep)
  return logits_BTV, cache
