"""Lossless CoreInfer: the compact-FFN model drafts, the dense model verifies.

Each round starts from the last emitted token t0 (not yet in the cache; it
goes to slot L = cache.length):
1. `draft_fn`: N steps of the sparse model in one `lax.scan`: d1..dN, and
   for sampling each step's draft distribution q_i. It writes its own K/V at
   slots L..L+N-1; the verify rewrites them.
2. `verify_fn`: the dense model over [t0, d1..dN] in one teacher-forced
   pass from slot L. It reads every weight once for N + 1 tokens, gives the
   dense distributions p_0..p_N, and rewrites slots L..L+N with dense K/V,
   so the next draft continues from a dense history.
   - Greedy: d_{i+1} is accepted while it is p_i's argmax, so the output is
     dense greedy decoding.
   - Sampling: d_{i+1} is accepted with probability min(1, p_i(d)/q_i(d)),
     else replaced by a draw from max(0, p_i - q_i) normalised; after N
     acceptances comes a draw from p_N (speculative sampling, Leviathan et al.
     2023, Chen et al. 2023). Each emitted token is distributed as the dense
     model's.
   The batch shares one cache length, so it advances by the smallest accepted
   count a: every sequence emits its tokens at positions 0..a (the accepted
   drafts, then the decision at position a). A sequence that accepted more
   re-drafts the rest; this is still exact, since each position's decision
   depends on its prefix only. `cache.length` becomes L + a + 1; the slots past
   it are stale, and no query sees them before they are rewritten.
Shapes are static: each function compiles once per (batch, N, cache length).
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from coreinfer_jax.core import selection
from coreinfer_jax.core.spec import CoreSpec
from coreinfer_jax.model.cache import KVCache
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.forward import forward, forward_tapped
from coreinfer_jax.model.params import ModelParams
from coreinfer_jax.runtime import mesh as meshes
from coreinfer_jax.runtime.sampling import SamplingConfig, argmax, probabilities, sample

# Salts keeping the draft's and the verify's random draws apart.
_DRAFT, _VERIFY, _ACCEPT, _RESIDUAL = 0, 1, 2, 3


def check_verify(num_draft: int, sparse: bool, on_mesh: bool, offload_ffn: bool) -> None:
  """Refuses, in one line, a lossless mode that cannot run."""
  if num_draft < 0:
    raise ValueError(f"--verify must be at least 0 (0: off), got {num_draft}")
  if not num_draft:
    return
  if not sparse:
    raise ValueError("--verify needs a sparse method: it is the compact-FFN model that drafts")
  if on_mesh:
    raise ValueError("--verify on a device mesh (--tp > 1) is not built yet")
  if offload_ffn:
    raise ValueError("--verify reads every weight in its dense pass; it does not combine with "
                     "--offload_ffn")


def draft_fn(config: ModelConfig, sampling: SamplingConfig, num_draft: int,
             mesh: Optional[Mesh] = None):
  """(sparse params, cache, tokens [B], key) -> (drafts int32 [B, N], draft
  probabilities float32 [B, N, V] (sampling; [B, N, 0] when greedy), cache)."""
  def draft(params: ModelParams, cache: KVCache, tokens_B, key):
    key = jax.random.fold_in(key, _DRAFT)

    def step(carry, _):
      cache, tokens_B = carry
      logits, cache = forward(params, config, cache, tokens_B[:, None])
      logits_BV = logits[:, 0]
      next_B = sample(logits_BV, jax.random.fold_in(key, cache.length), sampling)
      q_BV = (logits_BV[:, :0] if sampling.greedy else probabilities(logits_BV, sampling))
      return (cache, next_B), (next_B, q_BV)

    (cache, _), (drafts_NB, q_NBV) = jax.lax.scan(step, (cache, tokens_B), None, length=num_draft)
    drafts_BN, q_BNV = drafts_NB.T, jnp.swapaxes(q_NBV, 0, 1)
    cache, (drafts_BN, q_BNV) = meshes.constrain_outputs(mesh, cache, (drafts_BN, q_BNV))
    return drafts_BN, q_BNV, cache
  return draft


def _decisions(logits_BNV: jax.Array, drafts_BN: jax.Array, q_BNV: jax.Array,
               sampling: SamplingConfig, key: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """(accepted bool [B, N], the token each position emits int32 [B, N + 1]:
  the draft where accepted, else the dense model's correction; the last
  position, the dense model's own next token)."""
  B, N = drafts_BN.shape
  flat = lambda x: x.reshape((B * (N + 1),) + x.shape[2:])   # noqa: E731
  if sampling.greedy:
    dense_BN1 = argmax(flat(logits_BNV)).reshape(B, N + 1)
    return drafts_BN == dense_BN1[:, :N], dense_BN1
  p_BNV = probabilities(flat(logits_BNV), sampling).reshape(B, N + 1, -1)
  pick = lambda probs, tokens: jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]  # noqa: E731
  u_BN = jax.random.uniform(jax.random.fold_in(key, _ACCEPT), (B, N))
  accepted_BN = u_BN * pick(q_BNV, drafts_BN) < pick(p_BNV[:, :N], drafts_BN)
  residual = jnp.maximum(p_BNV[:, :N] - q_BNV, 0.0)
  residual = jnp.concatenate([residual, p_BNV[:, N:]], axis=1)   # after N acceptances: p_N itself
  keys = jax.random.split(jax.random.fold_in(key, _RESIDUAL), B * (N + 1))
  # log(0) = -inf: a token the residual excludes is never drawn
  draws = jax.vmap(jax.random.categorical)(keys, jnp.log(flat(residual)))
  corrections_BN1 = draws.reshape(B, N + 1).astype(jnp.int32)
  emitted = jnp.where(accepted_BN, drafts_BN, corrections_BN1[:, :N])
  return accepted_BN, jnp.concatenate([emitted, corrections_BN1[:, N:]], axis=1)


def verify_fn(config: ModelConfig, sampling: SamplingConfig, mesh: Optional[Mesh] = None,
              refresh: Optional[CoreSpec] = None):
  """(dense params, cache after the draft, tokens [B], drafts [B, N], draft
  probabilities, key) -> (emitted int32 [B, N + 1] (the first a + 1 are
  this round's), a int32 [] (the batch's accepted count), accepted int32 [B]
  (each sequence's own count), the next tokens [B], cache).

  With `refresh` (`--refresh`), it also takes the running ranking keys (per
  layer (primary, secondary) [B, F], None for a dense layer) and returns them
  with the kept positions' (t0, d1..da: now the dense history) added: the
  dense pass's own neuron values, scored by `refresh`'s rule."""
  layers = () if refresh is None else frozenset(refresh.sparse_layers)
  tap = None if refresh is None else (lambda layer, values, real: values if layer in layers
                                      else None)

  def verify(params: ModelParams, cache: KVCache, tokens_B, drafts_BN, q_BNV, key, keys=None):
    N = drafts_BN.shape[1]
    start = cache.length - N   # the draft wrote N slots; the dense pass rewrites them
    cache = cache.replace(length=start)
    chunk_BN1 = jnp.concatenate([tokens_B[:, None], drafts_BN], axis=1)
    logits_BNV, cache, values = forward_tapped(params, config, cache, chunk_BN1, tap)
    accepted_BN, emitted_BN1 = _decisions(logits_BNV, drafts_BN, q_BNV, sampling,
                                          jax.random.fold_in(jax.random.fold_in(key, _VERIFY), start))
    accepted_B = jnp.sum(jnp.cumprod(accepted_BN.astype(jnp.int32), axis=1), axis=1)
    a = jnp.min(accepted_B)
    next_B = jax.lax.dynamic_index_in_dim(emitted_BN1, a, axis=1, keepdims=False)
    cache = cache.replace(length=start + a + 1)
    out = (emitted_BN1, a, accepted_B, next_B)
    if refresh is not None:
      kept_BN1 = jnp.broadcast_to(jnp.arange(N + 1) <= a, chunk_BN1.shape)
      out += (tuple(None if v is None else _added(k, selection.core_statistics(
          v, kept_BN1, scoring=refresh.scoring, alpha=refresh.alpha, top_m=refresh.top_m))
          for k, v in zip(keys, values)),)
    cache, out = meshes.constrain_outputs(mesh, cache, out)
    return out[:4] + (cache,) + out[4:]
  return verify


def _added(a: Tuple[jax.Array, ...], b: Tuple[jax.Array, ...]) -> Tuple[jax.Array, ...]:
  return tuple(x + y.astype(x.dtype) for x, y in zip(a, b))


def verify_record(num_draft: int, batch: int, verify_rounds: int, drafts_accepted: int,
                  batch_accepted: int, draft_seconds: float, verify_seconds: float) -> dict:
  """The JSON fields of a lossless run (`GenerationStats`' verify counters):
  the fraction of drafted tokens the dense model accepted (each sequence's
  own count), the batch's mean advance beyond the dense token per verify,
  and the seconds of the drafts and of the verifies."""
  drafted = verify_rounds * num_draft * batch
  return {"verify": num_draft,
          "acceptance_rate": drafts_accepted / drafted if drafted else None,
          "mean_accepted_per_verify": batch_accepted / verify_rounds if verify_rounds else None,
          "draft_seconds": draft_seconds, "verify_seconds": verify_seconds}
