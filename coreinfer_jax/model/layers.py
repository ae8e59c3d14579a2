"""The decoder's building blocks as pure functions."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.params import AttentionParams, NormParams


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis; statistics in f32."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale * y.astype(x.dtype)


@jax.named_scope("norm")
def norm(config: ModelConfig, p: NormParams, x: jax.Array) -> jax.Array:
  """`config.norm`: RMSNorm, or LayerNorm (with bias); statistics in f32."""
  eps = config.norm_eps
  if config.norm == "rms":
    return rms_norm(x, p.scale_D, eps)
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * p.scale_D + p.bias_D).astype(x.dtype)


def rope_inv_freq(config: ModelConfig, windowed: bool = False) -> np.ndarray:
  """Inverse frequencies [hd/2], with linear or llama3 scaling as transformers;
  a `windowed` layer uses `config.local_rope_theta` unscaled where it is set."""
  hd = config.head_dim
  exponents = np.arange(0, hd, 2, dtype=np.float32) / hd
  if windowed and config.local_rope_theta is not None:
    return (1.0 / (config.local_rope_theta ** exponents)).astype(np.float32)
  inv_freq = 1.0 / (config.rope_theta ** exponents)
  inv_freq = inv_freq / config.rope_linear_factor
  s = config.rope_scaling
  if s is None:
    return inv_freq.astype(np.float32)
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BTHK: jax.Array, positions_BT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Half-rotation RoPE (the Hugging Face layout)."""
  angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq   # [B, T, hd/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHK.dtype)


def linear(x: jax.Array, weight_OI: jax.Array, bias_O: Optional[jax.Array] = None) -> jax.Array:
  y = jnp.einsum("...i,oi->...o", x, weight_OI)
  return y if bias_O is None else y + bias_O


def attention(p: AttentionParams, config: ModelConfig, x_BTD: jax.Array, positions_BT: jax.Array,
              k_cache: jax.Array, v_cache: jax.Array, write_slot: jax.Array, start_B: jax.Array,
              window: Optional[int] = None) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Writes this chunk's K/V at slots [write_slot, write_slot + T) of the
  caches (K `[B, KVH, hd, S]`, V `[B, KVH, S, hd]`) and attends causally over
  the cache, skipping each
  sequence's padding; with a `window` W, each query sees only the W most
  recent slots (itself included) whatever the cache length. Returns
  (output [B, T, D], k_cache, v_cache)."""
  B, T, _ = x_BTD.shape
  H, KVH, hd = config.num_heads, config.num_kv_heads, config.head_dim
  with jax.named_scope("attention_projections"):
    q = linear(x_BTD, p.q_weight, p.q_bias).reshape(B, T, H, hd)
    k = linear(x_BTD, p.k_weight, p.k_bias).reshape(B, T, KVH, hd)
    v = linear(x_BTD, p.v_weight, p.v_bias).reshape(B, T, KVH, hd)
  if config.qk_norm:
    with jax.named_scope("norm"):
      q = rms_norm(q, p.q_norm_K, config.norm_eps)
      k = rms_norm(k, p.k_norm_K, config.norm_eps)
  if config.positions == "rope":
    with jax.named_scope("rope"):
      inv_freq = rope_inv_freq(config, windowed=window is not None)
      q = apply_rope(q, positions_BT, inv_freq)
      k = apply_rope(k, positions_BT, inv_freq)
  with jax.named_scope("cache_write"):
    zero = jnp.zeros((), jnp.int32)
    k_cache = jax.lax.dynamic_update_slice(
        k_cache, k.transpose(0, 2, 3, 1).astype(k_cache.dtype), (zero, zero, zero, write_slot))
    v_cache = jax.lax.dynamic_update_slice(
        v_cache, v.swapaxes(1, 2).astype(v_cache.dtype), (zero, zero, write_slot, zero))

  S = v_cache.shape[2]
  q_slot_T = write_slot + jnp.arange(T, dtype=jnp.int32)
  k_slot_S = jnp.arange(S, dtype=jnp.int32)
  visible_BTS = (k_slot_S[None, None, :] <= q_slot_T[None, :, None]) & (
      k_slot_S[None, None, :] >= start_B[:, None, None])
  if window is not None:
    visible_BTS = visible_BTS & (k_slot_S[None, None, :] > q_slot_T[None, :, None] - window)
  q = q.reshape(B, T, KVH, H // KVH, hd).transpose(0, 2, 3, 1, 4)   # [B, KVH, G, T, hd]
  with jax.named_scope("attention_over_cache"):
    out = attend_filled(q, k_cache, v_cache, visible_BTS, config.query_scale or 1.0 / math.sqrt(hd),
                        filled=write_slot + T)
  with jax.named_scope("attention_projections"):
    return linear(out, p.o_weight, p.o_bias), k_cache, v_cache


def attention_spans(cache_len: int, num_tokens: int, smallest: int = 128) -> Tuple[int, ...]:
  """The cache prefixes a chunk of `num_tokens` may attend over: powers of two
  from `smallest` (those of at least `num_tokens` slots) and the whole cache,
  so a chunk reads at most twice the filled part (and `smallest` slots)."""
  spans = []
  span = smallest
  while span < cache_len:
    if span >= num_tokens:
      spans.append(span)
    span *= 2
  return tuple(spans) + (cache_len,)


def attend_filled(q_BKGTH: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                  visible_BTS: jax.Array, scale: float, filled: jax.Array) -> jax.Array:
  """`attend` over the shortest span of `attention_spans` holding the `filled`
  slots (a traced count), chosen on the device: one compiled function serves
  every cache length and reads only what has been written. Exact: the slots
  past `filled` are masked in `visible_BTS` anyway."""
  S = v_cache.shape[2]
  spans = attention_spans(S, q_BKGTH.shape[3])

  def over(span):
    return lambda q, k, v, vis: attend(q, k[..., :span], v[:, :, :span], vis[..., :span], scale)
  index = jnp.searchsorted(jnp.asarray(spans, jnp.int32), filled)   # the first span >= filled
  return jax.lax.switch(index, [over(span) for span in spans], q_BKGTH, k_cache, v_cache,
                        visible_BTS)


def attend(q_BKGTH: jax.Array, k_cache: jax.Array, v_cache: jax.Array, visible_BTS: jax.Array,
           scale: float) -> jax.Array:
  """Softmax attention of grouped queries `[B, KVH, G, T, hd]` over the
  caches (K `[B, KVH, hd, S]`, V `[B, KVH, S, hd]`) where `visible_BTS`;
  returns `[B, T, KVH*G*hd]`. Decoding (T = 1) multiplies and reduces where
  the cache lies, and each reduction runs over a major axis so that it
  vectorises along the minor one: q·K over hd along slots, p·V over slots
  along hd (keys stored `[S, hd]` made q·K a per-slot horizontal sum: 2.2 vs
  1.2 ms per SmolLM2 step over 512 slots, issue #16)."""
  B, KVH, G, T, hd = q_BKGTH.shape
  if T == 1:
    # Decode: multiply-reduce reads the cache where it lies; a dot_general
    # here makes XLA:CPU copy the whole cache into its preferred layout.
    scores = jnp.sum(q_BKGTH[:, :, :, 0, :, None].astype(jnp.float32) * k_cache[:, :, None],
                     axis=3)[:, :, :, None]
  else:
    scores = jnp.einsum("bkgth,bkhs->bkgts", q_BKGTH, k_cache, preferred_element_type=jnp.float32)
  scores = jnp.where(visible_BTS[:, None, None], scores * scale, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
  if T == 1:
    out = jnp.sum(probs[:, :, :, 0, :, None] * v_cache[:, :, None], axis=3)[:, :, :, None]
  else:
    out = jnp.einsum("bkgts,bksh->bkgth", probs, v_cache)
  return out.transpose(0, 3, 1, 2, 4).reshape(B, T, KVH * G * hd)
