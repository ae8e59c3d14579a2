"""Next-token choice inside the jitted step: greedy, or temperature/top-k/top-p."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static (hashable): a change of sampling settings compiles a new step."""
  temperature: float = 0.0   # 0: greedy
  top_k: int = 0             # 0: no top-k filter
  top_p: float = 1.0         # 1: no nucleus filter

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def _filter(logits_V: jax.Array, cfg: SamplingConfig) -> jax.Array:
  neg_inf = jnp.finfo(logits_V.dtype).min
  if cfg.top_k:
    kth = jax.lax.top_k(logits_V, cfg.top_k)[0][-1]
    logits_V = jnp.where(logits_V < kth, neg_inf, logits_V)
  if cfg.top_p < 1:
    sorted_desc = jnp.sort(logits_V)[::-1]
    probs = jax.nn.softmax(sorted_desc)
    mass_before = jnp.cumsum(probs) - probs
    # Keep the smallest prefix whose mass reaches top_p (always the top token).
    cutoff = jnp.min(jnp.where(mass_before < cfg.top_p, sorted_desc, jnp.inf))
    logits_V = jnp.where(logits_V < cutoff, neg_inf, logits_V)
  return logits_V


def probabilities(logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """float32 [B, V]: the distribution `sample` draws from (the temperature,
  then the top-k and top-p filters); sampling only."""
  scaled_BV = logits_BV.astype(jnp.float32) / cfg.temperature
  return jax.nn.softmax(jax.vmap(lambda l: _filter(l, cfg))(scaled_BV), axis=-1)


def argmax(logits_BV: jax.Array) -> jax.Array:
  """`jnp.argmax` over the last axis (the first index of the largest value), as
  two plain reductions: XLA:CPU runs argmax's paired (value, index) reduction
  at ~1 GB/s, 0.23 ms for SmolLM2's 49152 logits; a max, then the smallest
  index holding it, takes 0.04 ms (issue #16). Logits are finite."""
  V = logits_BV.shape[-1]
  largest_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
  index_V = jnp.arange(V, dtype=jnp.int32)
  return jnp.min(jnp.where(logits_BV == largest_B1, index_V, V), axis=-1)


@jax.named_scope("sampling")
def sample(logits_BV: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """int32 [B]. Row b draws with `fold_in(key, b)`."""
  if cfg.greedy:
    return argmax(logits_BV)
  logits_BV = logits_BV.astype(jnp.float32) / cfg.temperature
  keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(logits_BV.shape[0]))
  draw = lambda k, l: jax.random.categorical(k, _filter(l, cfg))
  return jax.vmap(draw)(keys, logits_BV).astype(jnp.int32)
