"""The decoder forward pass as one pure function over a chunk of tokens.

`forward` writes the chunk's keys and values into the cache at slot
`cache.length` and returns logits; prefill is a chunk written at slot 0,
decoding is a chunk of one token. The same function serves both, so the
cached step-by-step path cannot drift from the full forward pass.

A *tap* sees every layer's FFN neuron values inside that one pass
(`forward_tapped`): core-neuron selection, clustering statistics and the
analyses are taps, so none of them needs hooks or a second pass.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from coreinfer_jax.model import layers
from coreinfer_jax.model.cache import KVCache
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.ffn import NeuronValues, ffn_output, neuron_values
from coreinfer_jax.model.params import LayerParams, ModelParams

# (layer index, that layer's NeuronValues [B, T, N], real-token mask bool [B, T])
# -> anything (a pytree of arrays, or None): collected per layer.
Tap = Callable[[int, NeuronValues, jax.Array], Any]


def positions(cache: KVCache, num_tokens: int) -> jax.Array:
  """Position ids [B, T] of the next chunk: slots counted from each sequence's
  first real slot (pad slots get position 0)."""
  slots = cache.length + jnp.arange(num_tokens, dtype=jnp.int32)
  return jnp.maximum(slots[None, :] - cache.start_B[:, None], 0)


@jax.named_scope("embedding")
def embed(params: ModelParams, config: ModelConfig, tokens_BT: jax.Array,
          positions_BT: jax.Array) -> jax.Array:
  x = params.embed_VE[tokens_BT]
  if config.embed_scale != 1.0:
    x = x * jnp.asarray(config.embed_scale, x.dtype)
  if params.project_in_DE is not None:
    x = layers.linear(x, params.project_in_DE)
  if config.positions == "learned":
    x = x + params.positions_PD[positions_BT + config.position_offset]
  return x


def layer_forward(p: LayerParams, config: ModelConfig, x_BTD: jax.Array, positions_BT: jax.Array,
                  k_cache: jax.Array, v_cache: jax.Array, write_slot: jax.Array,
                  start_B: jax.Array, window: Optional[int] = None,
                  tap: Optional[Callable[[NeuronValues], Any]] = None):
  """One decoder block. Returns (x, k_cache, v_cache, the tap's output or None)."""
  post = config.norm_placement == "post"
  sandwich = config.norm_placement == "sandwich"
  attn_in = x_BTD if post else layers.norm(config, p.attn_norm, x_BTD)
  attn_out, k_cache, v_cache = layers.attention(
      p.attn, config, attn_in, positions_BT, k_cache, v_cache, write_slot, start_B, window)
  if sandwich:
    attn_out = layers.norm(config, p.attn_out_norm, attn_out)
  x_BTD = x_BTD + attn_out
  if post:
    x_BTD = layers.norm(config, p.attn_norm, x_BTD)
  ffn_in = x_BTD if post else layers.norm(config, p.ffn_norm, x_BTD)
  ffn = p.ffn.for_input(ffn_in)   # a token-wise kind picks each token's neurons here
  values = neuron_values(config, ffn, ffn_in)
  tapped = tap(values) if tap else None
  ffn_out = ffn_output(ffn, values.h)
  if sandwich:
    ffn_out = layers.norm(config, p.ffn_out_norm, ffn_out)
  x_BTD = x_BTD + ffn_out
  if post:
    x_BTD = layers.norm(config, p.ffn_norm, x_BTD)
  return x_BTD, k_cache, v_cache, tapped


@jax.named_scope("output_matrix")
def logits(params: ModelParams, config: ModelConfig, x_BTD: jax.Array) -> jax.Array:
  if params.final_norm is not None:
    x_BTD = layers.norm(config, params.final_norm, x_BTD)
  if params.project_out_ED is not None:
    x_BTD = layers.linear(x_BTD, params.project_out_ED)
  return jnp.einsum("bte,ve->btv", x_BTD, params.output_embedding,
                    preferred_element_type=jnp.float32)


# (layer index, its parameters) -> the parameters the pass computes with there
# (e.g. host-offloaded weights copied into device memory, one layer at a time).
UseLayer = Callable[[int, LayerParams], LayerParams]


def forward_tapped(params: ModelParams, config: ModelConfig, cache: KVCache, tokens_BT: jax.Array,
                   tap: Optional[Tap], last_only: bool = False,
                   use_layer: Optional[UseLayer] = None,
                   ) -> Tuple[jax.Array, KVCache, Tuple[Any, ...]]:
  """Runs a chunk of tokens [B, T] at slots [cache.length, cache.length + T).

  Returns (float32 logits [B, T, V], or [B, 1, V] with `last_only`; the cache
  with the chunk written; per layer, what `tap` returned, or None without a
  tap). Python-unrolled over layers (GUIDE §2); `use_layer` maps each layer's
  parameters just before the layer runs (default: as they are).
  """
  T = tokens_BT.shape[1]
  pos_BT = positions(cache, T)
  real_BT = (cache.length + jnp.arange(T, dtype=jnp.int32))[None, :] >= cache.start_B[:, None]
  x = embed(params, config, tokens_BT, pos_BT)
  new_k, new_v, tapped = [], [], []
  for i, (p, k_cache, v_cache) in enumerate(zip(params.layers, cache.k, cache.v)):
    layer_tap = (lambda values, i=i: tap(i, values, real_BT)) if tap else None
    p = use_layer(i, p) if use_layer else p
    x, k_cache, v_cache, out = layer_forward(p, config, x, pos_BT, k_cache, v_cache,
                                             cache.length, cache.start_B,
                                             config.layer_window(i), layer_tap)
    new_k.append(k_cache)
    new_v.append(v_cache)
    tapped.append(out)
  if last_only:
    x = x[:, -1:]
  cache = cache.replace(k=tuple(new_k), v=tuple(new_v), length=cache.length + T)
  return logits(params, config, x), cache, tuple(tapped)


def forward(params: ModelParams, config: ModelConfig, cache: KVCache, tokens_BT: jax.Array,
            last_only: bool = False) -> Tuple[jax.Array, KVCache]:
  """`forward_tapped` without a tap: (logits, cache)."""
  logits_BTV, cache, _ = forward_tapped(params, config, cache, tokens_BT, None, last_only)
  return logits_BTV, cache
