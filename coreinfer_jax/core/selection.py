"""Core-neuron selection from a prompt's FFN activations, as pure functions.

Every function takes one layer's `NeuronValues` `[B, T, F]` over a (padded)
prompt and a mask of its real tokens `[B, T]`, and returns exactly k distinct
neuron indices per sequence, `int32 [B, k]`, with k static.

Stability rule (GUIDE §1, faithful to the official code for `signed`):
1. m = floor(α · mean over real tokens of |{i : s_t[i] > 0}|), in float32;
2. each real token's m neurons of largest score s_t (ties: lower index first)
   are that token's core neurons;
3. neurons are ranked by how many tokens had them as core, then by their score
   summed over real tokens (this fills k when fewer than k neurons were ever
   core), then by index; the first k are kept.
`signed` scores s = the neuron value (for ReLU FFNs the fc1 output before the
ReLU, as the official code); `magnitude` scores s = |h|; `wina` scores
s = |h|·c with c the neuron's down-projection column norm ||down[:, i]||₂
(WINA, arXiv 2505.19427: the size of the neuron's contribution to the
block's output, not of its activation alone). `griffin` ranks neurons by the
norm over tokens of each token's L2-normalised h (GRIFFIN; ranked by its
square, a sum over tokens); `wina_griffin` is the same over h·c.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
from jax import lax

from coreinfer_jax.core.spec import TOKEN_WISE_SCORINGS, TOP_M_ALGORITHMS
from coreinfer_jax.model.ffn import NeuronValues


def _sortable_keys(x: jax.Array) -> jax.Array:
  """uint32 keys whose unsigned order is the float32 order of `x`."""
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  negative = (bits >> 31).astype(bool)
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


# Tokens per block of the token-wise pass: a block's scores `[F, 8]` stay in
# cache through the 32 counting passes, and 8 int32 lanes fill one AVX2 vector
# (1.7x faster than whole-prompt passes on the TinyLlama shape, XLA:CPU).
TOKEN_BLOCK = 8


def _threshold_key(keys_BFC: jax.Array, m_BC: jax.Array) -> jax.Array:
  """Per column c, a key v whose `keys >= v` holds exactly the m largest when
  they are unambiguous, else (ties at the m-th) the m-th largest key itself:
  bisection over the 32 key bits, one counting pass per bit, stopping once
  every column's count is exactly m (about 20 passes for real activations).
  On XLA:CPU this is far faster than `lax.top_k` with k in the thousands."""
  def unresolved(state):
    bit, _, exact = state
    return (bit >= 0) & ~jnp.all(exact)

  def set_bit(state):
    bit, answer, exact = state
    candidate = answer | (jnp.uint32(1) << bit.astype(jnp.uint32))
    count = jnp.sum(keys_BFC >= candidate[:, None, :], axis=1, dtype=jnp.int32)
    take = (count >= m_BC) & ~exact
    return bit - 1, jnp.where(take, candidate, answer), exact | (take & (count == m_BC))

  start = (jnp.int32(31), jnp.zeros(m_BC.shape, jnp.uint32), jnp.zeros(m_BC.shape, bool))
  return lax.while_loop(unresolved, set_bit, start)[1]


def _top_m_block(scores_BFC: jax.Array, m_BC: jax.Array) -> jax.Array:
  """bool [B, F, C]: each column's m largest scores, ties broken by lower index."""
  keys = _sortable_keys(scores_BFC)
  threshold = _threshold_key(keys, m_BC)[:, None, :]
  above = keys > threshold
  at = keys == threshold
  room_B1C = m_BC[:, None, :] - jnp.sum(above, axis=1, keepdims=True, dtype=jnp.int32)

  def break_ties(_):
    return above | (at & (jnp.cumsum(at, axis=1, dtype=jnp.int32) <= room_B1C))

  # Ties at the threshold are rare for real activations; skip the cumsum then.
  ties = jnp.any(jnp.sum(at, axis=1, keepdims=True, dtype=jnp.int32) > room_B1C)
  return lax.cond(ties, break_ties, lambda _: above | at, None)


def top_m_mask(scores_BTF: jax.Array, m_BT: jax.Array) -> jax.Array:
  """bool [B, T, F]: each row's m largest scores, ties broken by lower index."""
  return jnp.swapaxes(_top_m_block(jnp.swapaxes(scores_BTF, 1, 2), m_BT), 1, 2)


def _descending(x: jax.Array) -> jax.Array:
  """A sort key for descending order (with -0.0 equal to 0.0)."""
  return jnp.where(x == 0, jnp.zeros_like(x), -x)


def rank_in_blocks(per_block: int, blocks: int, *keys_BF: jax.Array) -> jax.Array:
  """int32 [B, blocks, per_block]: in each of `blocks` equal consecutive
  neuron blocks, its first `per_block` neurons ordered by the keys
  (descending, lexicographic), then by index; indices are over all neurons."""
  B, F = keys_BF[0].shape
  size = F // blocks
  keys = tuple(_descending(key).reshape(B, blocks, size) for key in keys_BF)
  index = lax.broadcasted_iota(jnp.int32, (B, blocks, size), 2)
  ordered = lax.sort(keys + (index,), dimension=-1, num_keys=len(keys) + 1)[-1]
  offset = lax.broadcasted_iota(jnp.int32, (1, blocks, 1), 1) * size
  return ordered[:, :, :per_block] + offset


def rank_neurons(k: int, *keys_BF: jax.Array) -> jax.Array:
  """int32 [B, k]: neurons ordered by the keys (descending, lexicographic),
  then by index."""
  return rank_in_blocks(k, 1, *keys_BF)[:, 0]


def _token_blocks(x_BT: jax.Array) -> jax.Array:
  """[B, T, ...] -> [T/C, B, ..., C], zero-padding T up to a multiple of C."""
  B, T = x_BT.shape[:2]
  pad = -T % TOKEN_BLOCK
  x = jnp.pad(x_BT, [(0, 0), (0, pad)] + [(0, 0)] * (x_BT.ndim - 2), constant_values=0)
  x = x.reshape((B, (T + pad) // TOKEN_BLOCK, TOKEN_BLOCK) + x_BT.shape[2:])
  return jnp.moveaxis(jnp.moveaxis(x, 2, -1), 1, 0)


def _counts_by_bisection(scores_BTF: jax.Array, m_BT: jax.Array) -> jax.Array:
  """`token_core_counts` by `_top_m_block`, token block after token block."""
  def add_block(counts_BF, block):
    scores_BFC, m_BC = block
    return counts_BF + jnp.sum(_top_m_block(scores_BFC, m_BC), axis=-1, dtype=jnp.int32), None

  blocks = (_token_blocks(scores_BTF), _token_blocks(m_BT))   # pad columns have m = 0
  counts_BF = jnp.zeros((scores_BTF.shape[0], scores_BTF.shape[2]), jnp.int32)
  return lax.scan(add_block, counts_BF, blocks)[0]


def _counts_by_top_k(scores_BTF: jax.Array, m_BT: jax.Array, m_max: int) -> jax.Array:
  """`token_core_counts` by `lax.top_k` of the static `m_max` >= every m
  (ties: lower index first, as `lax.top_k` orders them), the first m of each
  token's kept, scattered into counts."""
  B, T, F = scores_BTF.shape
  signed = lax.bitcast_convert_type(_sortable_keys(scores_BTF) ^ jnp.uint32(0x80000000), jnp.int32)
  _, top_BTM = lax.top_k(signed, m_max)
  kept_BTM = lax.broadcasted_iota(jnp.int32, top_BTM.shape, 2) < m_BT[..., None]
  batch_BTM = lax.broadcasted_iota(jnp.int32, top_BTM.shape, 0)
  return jnp.zeros((B, F), jnp.int32).at[batch_BTM, top_BTM].add(kept_BTM.astype(jnp.int32))


def token_core_counts(scores_BTF: jax.Array, real_BT: jax.Array, alpha: float,
                      top_m: str = "bisection") -> jax.Array:
  """int32 [B, F]: in how many real tokens each neuron is a token-wise core
  neuron, its top m found by `top_m` (`spec.TOP_M_ALGORITHMS`)."""
  real = real_BT.astype(bool)
  positive_B = jnp.sum(jnp.where(real[..., None], scores_BTF > 0, False), axis=(1, 2),
                       dtype=jnp.int32)
  real_tokens_B = jnp.maximum(jnp.sum(real, axis=-1, dtype=jnp.int32), 1)
  m_B = jnp.floor(jnp.float32(alpha) * positive_B.astype(jnp.float32)
                  / real_tokens_B.astype(jnp.float32)).astype(jnp.int32)
  m_BT = jnp.where(real, m_B[:, None], 0)   # pad tokens choose nothing
  if top_m == "bisection":
    return _counts_by_bisection(scores_BTF, m_BT)
  F = scores_BTF.shape[-1]
  if top_m == "top_k":   # m <= α·F; one more covers float32 rounding
    return _counts_by_top_k(scores_BTF, m_BT, min(F, int(alpha * F) + 1))
  raise ValueError(f"unknown top-m algorithm {top_m!r}; choose one of "
                   f"{', '.join(TOP_M_ALGORITHMS)}")


def token_scores(values: NeuronValues, scoring: str) -> jax.Array:
  """What the token-wise top-m ranks (`TOKEN_WISE_SCORINGS`): the neuron
  value (before the ReLU for ReLU FFNs), |h|, or |h|·||down[:, i]||."""
  if scoring == "signed":
    return values.values
  if scoring == "magnitude":
    return jnp.abs(values.h)
  if scoring == "wina":
    return jnp.abs(values.h).astype(jnp.float32) * values.out_norms
  raise ValueError(f"scoring {scoring!r} has no token-wise core neurons; those that do: "
                   f"{', '.join(TOKEN_WISE_SCORINGS)}")


def _griffin_statistics(h_BTF: jax.Array, real_BT1: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """(sum over real tokens of each token's L2-normalised h squared, 0)."""
  norms_BT1 = jnp.sqrt(jnp.sum(h_BTF * h_BTF, axis=-1, keepdims=True))
  normalised = jnp.where(real_BT1, h_BTF / jnp.maximum(norms_BT1, 1e-30), 0.0)
  squares_BF = jnp.sum(normalised * normalised, axis=1)
  return squares_BF, jnp.zeros_like(squares_BF)


def core_statistics(values: NeuronValues, real_BT: jax.Array, *, scoring: str,
                    alpha: float, top_m: str = "bisection") -> Tuple[jax.Array, jax.Array]:
  """Per-neuron ranking keys (primary [B, F], secondary [B, F]): the core
  neurons are the k first by (primary, secondary) descending, then by index.
  Token-wise scorings (signed, magnitude, wina): (token-wise core count,
  score summed over real tokens); griffin and wina_griffin: (sum over tokens
  of each token's L2-normalised h, or h·||down[:, i]||, squared, 0). Both
  keys are sums over tokens, so summing them over several sentences ranks the
  neurons of all their tokens together (a cluster's core set)."""
  real = real_BT[..., None]
  if scoring == "griffin":
    return _griffin_statistics(values.h.astype(jnp.float32), real)
  if scoring == "wina_griffin":
    return _griffin_statistics(values.h.astype(jnp.float32) * values.out_norms, real)
  scores = token_scores(values, scoring)
  summed_BF = jnp.sum(jnp.where(real, scores.astype(jnp.float32), 0.0), axis=1)
  return token_core_counts(scores, real_BT, alpha, top_m), summed_BF


def select_core(values: NeuronValues, real_BT: jax.Array, *, k: int, scoring: str,
                alpha: float, top_m: str = "bisection") -> jax.Array:
  """One layer's core neurons `int32 [B, k]` from its neuron values."""
  return rank_neurons(k, *core_statistics(values, real_BT, scoring=scoring, alpha=alpha,
                                          top_m=top_m))


def mix_importance(primary_BF: jax.Array, importance_F: jax.Array, weight: float) -> jax.Array:
  """float32 [B, F]: (1 − weight) · each sequence's share of its primary key
  + weight · the model-global importance (`core.importance`, summing to 1)."""
  primary = primary_BF.astype(jnp.float32)
  shares = primary / jnp.maximum(jnp.sum(primary, axis=-1, keepdims=True), 1e-30)
  return (1.0 - weight) * shares + weight * importance_F.astype(jnp.float32)
