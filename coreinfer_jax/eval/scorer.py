"""Log-likelihood of continuations as sparse decoding would produce them.

The evaluation trap (GUIDE §1): one dense forward pass over context +
continuation never decodes, so it scores a prefill-dense method exactly like
the dense model. Here, as in decoding:
1. the context is prefilled densely (bucketed, left-padded), and that pass
   ranks the neurons every policy asks for;
2. the continuation's first token is scored by the prefill's last logits
   (decoding samples it from those, dense);
3. every later continuation token is scored by one teacher-forced pass over
   the continuation with the context's KV cache, each policy's rows dropping
   its non-core neurons (`MaskedFFN`, h[i] = 0: what decoding on the FFN rows
   gathered down to the core set computes, equal to step-by-step sparse
   decoding to float rounding; exactly dense at β = 1). A predictor policy's
   rows keep each token's predicted top k instead (`PredictedMaskedFFN`):
   the prediction reads each token's own FFN input, so teacher forcing
   chooses what decoding that token would.

The host does a constant amount of work per context: one compiled call runs
the prefill, every policy's `core_sets` and the keep masks `[M, F]` per layer;
one compiled call scores every (policy, continuation) row; the host sums
each row's log-probabilities in a few vectorised numpy operations. Greedy
generation for evaluation works the same way: every policy decodes as one row
of a batch (a `lax.scan` over a fixed number of steps); stop strings and EOS
are applied on the host afterwards.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from coreinfer_jax.core.policy import CorePolicy, Dense, selection_tap
from coreinfer_jax.model.cache import KVCache
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.ffn import MaskedFFN
from coreinfer_jax.model.forward import forward
from coreinfer_jax.model.params import ModelParams
from coreinfer_jax.model.token_ffn import NeuronPredictor, PredictedMaskedFFN
from coreinfer_jax.runtime.batching import DEFAULT_BUCKETS, left_pad, pick_bucket
from coreinfer_jax.runtime.compile import CompiledFunctions
from coreinfer_jax.runtime.prefill import prefill
from coreinfer_jax.runtime.stopping import GenerationResult, StopTracker

CONTINUATION_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024)
KeepMasks = Tuple[jax.Array, ...]   # per layer float32 [M, F]: row m keeps policy m's neurons


def keep_mask(core: Optional[jax.Array], batch: int, num_neurons: int) -> jax.Array:
  """float32 [batch, F]: 1 at each row's core neurons (`core` int32 [batch, k],
  or [1, k] for a set shared by the batch); all ones for a dense layer (None)."""
  if core is None:
    return jnp.ones((batch, num_neurons), jnp.float32)
  rows = jnp.arange(core.shape[0])[:, None]
  mask = jnp.zeros((core.shape[0], num_neurons), jnp.float32).at[rows, core].set(1.0)
  return jnp.broadcast_to(mask, (batch, num_neurons))


def select_fn(config: ModelConfig, cache_len: int, policies: Sequence[CorePolicy]):
  """(params, tokens [1, T], start [1], each policy's arrays) -> (last-position
  log-probabilities [V], cache, keep masks, cluster ids int32 [M] (-1: none))."""
  L, F = config.num_layers, config.intermediate_size
  tap = selection_tap(L, policies)

  def run(params: ModelParams, tokens_BT, start_B, arrays):
    logits_BV, cache, rankings = prefill(params, config, tokens_BT, start_B, tap, cache_len)
    keep = [[] for _ in range(L)]
    cluster_ids = []
    for policy, policy_arrays in zip(policies, arrays):
      core, aux = policy.core_sets(rankings, policy_arrays, 1)
      for layer, core_BK in enumerate(core):
        keep[layer].append(keep_mask(core_BK, 1, F)[0])
      cluster_ids.append(aux["cluster_ids"][0] if "cluster_ids" in aux else jnp.int32(-1))
    return (jax.nn.log_softmax(logits_BV[0]), cache, tuple(jnp.stack(k) for k in keep),
            jnp.stack(cluster_ids))
  return run


def tile_cache(cache: KVCache, batch: int) -> KVCache:
  """A batch-1 cache repeated for `batch` rows over the same context."""
  tile = lambda a: jnp.broadcast_to(a, (batch,) + a.shape[1:])   # noqa: E731
  return cache.replace(k=tuple(map(tile, cache.k)), v=tuple(map(tile, cache.v)),
                       start_B=tile(cache.start_B))


@struct.dataclass
class TokenRows:
  """The rows of predictor policies: per layer, the predictor (None: no row
  predicts there), each policy row's k (int32 [M], 0: its fixed mask) and
  the largest (static)."""
  predictors: Tuple[Optional[NeuronPredictor], ...]
  k_M: Tuple[Optional[jax.Array], ...]
  k_max: Tuple[Optional[int], ...] = struct.field(pytree_node=False, default=())

  def repeat(self, times: int) -> "TokenRows":
    return self.replace(k_M=tuple(None if k is None else jnp.repeat(k, times) for k in self.k_M))


def token_rows(policies: Sequence[CorePolicy], num_layers: int) -> Optional[TokenRows]:
  """The `TokenRows` of `policies` (None when none predicts per token); every
  predictor policy must share one predictor."""
  predicting = [p for p in policies if p.token_predictors() is not None]
  if not predicting:
    return None
  predictors = predicting[0].token_predictors()
  if any(p.token_predictors() is not predictors for p in predicting):
    raise ValueError("the predictor methods of one run must share one predictor")
  k_LM = np.array([[0 if p.token_predictors() is None or p.spec.layer_k[i] is None
                    else p.spec.layer_k[i] for p in policies] for i in range(num_layers)], np.int32)
  return TokenRows(tuple(predictors),
                   tuple(jnp.asarray(k) if k.max() else None for k in k_LM),
                   tuple(int(k.max()) if k.max() else None for k in k_LM))


def masked_params(params: ModelParams, keep_rows: KeepMasks,
                  token: Optional[TokenRows] = None) -> ModelParams:
  """Every layer's FFN as a `MaskedFFN` keeping row r's neurons of
  `keep_rows[l][r]`, or, where `token` predicts, a `PredictedMaskedFFN`."""
  ffns = []
  for i, (layer, keep) in enumerate(zip(params.layers, keep_rows)):
    if token is None or token.k_max[i] is None:
      ffns.append(MaskedFFN(layer.ffn, keep))
    else:
      ffns.append(PredictedMaskedFFN(layer.ffn, keep, token.predictors[i], token.k_M[i],
                                     k_max=token.k_max[i]))
  return params.with_ffns(tuple(ffns))


def continuation_fn(config: ModelConfig, reference: Optional[int]):
  """(params, batch-1 cache, inputs int32 [C, T], targets int32 [C, T], keep
  masks [M, F] per layer, `TokenRows` or None) -> per policy m and continuation c, float32
  [M, C, T]: `logprob` of each target and `greedy` (target is the argmax);
  with `reference` (a row index of the masks), `kl`: the KL divergence of
  that row's next-token distribution to each row's. All M·C rows run as one
  batch over the context's cache."""
  def score(params: ModelParams, cache: KVCache, inputs_CT, targets_CT, keep: KeepMasks,
            token: Optional[TokenRows]):
    M, (C, T) = keep[0].shape[0], inputs_CT.shape
    rows = M * C
    keep_rows = tuple(jnp.repeat(k_MF, C, axis=0) for k_MF in keep)
    token = None if token is None else token.repeat(C)
    logits, _ = forward(masked_params(params, keep_rows, token), config, tile_cache(cache, rows),
                        jnp.tile(inputs_CT, (M, 1)))
    logprobs = jax.nn.log_softmax(logits, axis=-1).reshape(M, C, T, -1)
    targets = jnp.broadcast_to(targets_CT, (M, C, T))
    out = {"logprob": jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0],
           "greedy": (jnp.argmax(logprobs, axis=-1) == targets).astype(jnp.float32)}
    if reference is not None:
      ref = logprobs[reference]
      out["kl"] = jnp.sum(jnp.exp(ref)[None] * (ref[None] - logprobs), axis=-1)
    return out
  return score


def greedy_generation_fn(config: ModelConfig, steps: int):
  """(params, batch-1 cache, first token int32 [], keep masks [M, F] per
  layer, `TokenRows` or None) -> int32 [M, steps]: each policy's greedy
  tokens after the first, every policy a row of one batch over the prompt's cache."""
  def generate(params: ModelParams, cache: KVCache, first, keep: KeepMasks,
               token: Optional[TokenRows]):
    M = keep[0].shape[0]
    rows_params = masked_params(params, keep, token)

    def step(carry, _):
      cache, tokens_M = carry
      logits, cache = forward(rows_params, config, cache, tokens_M[:, None])
      tokens_M = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
      return (cache, tokens_M), tokens_M
    _, tokens_SM = jax.lax.scan(step, (tile_cache(cache, M), jnp.full((M,), first, jnp.int32)),
                                None, length=steps)
    return tokens_SM.T
  return generate


@dataclasses.dataclass
class ContinuationScores:
  """One policy's scores of a context's continuations (host arrays)."""
  logprob_sums: np.ndarray           # float64 [C]: the continuation's summed log-probabilities
  greedy: np.ndarray                 # bool [C]: every token was the argmax
  token_logprobs_CT: np.ndarray      # float32 [C, 1 + T]: per token (first from the prefill)
  lengths: np.ndarray                # int [C]: tokens of each continuation
  token_kl_CT: Optional[np.ndarray] = None   # float32 [C, 1 + T]: KL of dense to it (first: 0)
  cluster_id: Optional[int] = None

  @property
  def token_logprobs(self) -> List[np.ndarray]:
    return [row[:n] for row, n in zip(self.token_logprobs_CT, self.lengths)]

  @property
  def token_kl(self) -> Optional[List[np.ndarray]]:
    if self.token_kl_CT is None:
      return None
    return [row[:n] for row, n in zip(self.token_kl_CT, self.lengths)]


class ContinuationScorer:
  """Scores continuations of a context under several policies with one dense
  prefill and one batched pass. Sizes are bucketed so that executables
  repeat: a context pads to a bucket of `buckets`, continuations to one of
  `continuation_buckets`, and the cache holds `cache_len` slots every call."""

  def __init__(self, config: ModelConfig, params: ModelParams, policies: Sequence[CorePolicy], *,
               cache_len: int = 1024, buckets: Sequence[int] = DEFAULT_BUCKETS,
               continuation_buckets: Sequence[int] = CONTINUATION_BUCKETS):
    names = [p.name for p in policies]
    if len(set(names)) != len(names):
      raise ValueError(f"method names repeat: {names}")
    self.config = config
    self.params = params
    self.methods = tuple(policies)
    self.cache_len = cache_len
    self.buckets = tuple(sorted(buckets))
    self.continuation_buckets = tuple(sorted(continuation_buckets))
    self.compiled = CompiledFunctions()
    dense = [i for i, p in enumerate(self.methods) if p.spec is None]
    # The KL reference: the first dense policy, or a dense row added for it.
    self._kl_policies = self.methods + (() if dense else (Dense("reference dense"),))
    self._kl_reference = dense[0] if dense else len(self.methods)
    self._select = {"select": select_fn(config, cache_len, self.methods),
                    "select_kl": select_fn(config, cache_len, self._kl_policies)}
    self._arrays = tuple(p.arrays() for p in self._kl_policies)
    self._token_rows = {"select": token_rows(self.methods, config.num_layers),
                        "select_kl": token_rows(self._kl_policies, config.num_layers)}

  def layout(self, context_len: int, longest: int) -> Tuple[int, int]:
    """(context bucket, continuation bucket) for a context of `context_len`
    tokens and continuations of at most `longest`; ValueError if they do not
    fit (a caller can check a whole task before scoring any of it)."""
    bucket = pick_bucket(context_len, longest, self.cache_len, self.buckets)
    length, room = max(longest - 1, 1), self.cache_len - bucket
    fits = [b for b in self.continuation_buckets if length <= b <= room]
    if not fits:
      raise ValueError(f"a continuation of {length} tokens does not fit the cache after the "
                       f"context ({room} slots left of cache_len {self.cache_len}; continuation "
                       f"buckets {self.continuation_buckets})")
    return bucket, fits[0]

  def _prefill(self, context_ids: Sequence[int], bucket: int, with_kl: bool):
    tokens, start = left_pad([context_ids], bucket)
    # With a dense policy among the methods, it is the KL reference: no extra row.
    name = "select_kl" if with_kl and len(self._kl_policies) > len(self.methods) else "select"
    arrays = self._arrays if name == "select_kl" else self._arrays[:len(self.methods)]
    return self.compiled(name, self._select[name], self.params, jnp.asarray(tokens),
                         jnp.asarray(start), arrays) + (self._token_rows[name],)

  def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, *, eos_ids: Sequence[int] = (),
               stop_strings: Sequence[str] = (), tokenizer=None) -> Dict[str, GenerationResult]:
    """Per policy name, the greedy completion of `prompt_ids` as that policy
    decodes it (the first token from the dense prefill), cut at EOS and at the
    first stop string; `max_new_tokens` decode steps always run."""
    if not prompt_ids:
      raise ValueError("a prompt must have at least one token")
    bucket = pick_bucket(len(prompt_ids), max_new_tokens, self.cache_len, self.buckets)
    first_logprobs, cache, keep, _, token = self._prefill(prompt_ids, bucket, with_kl=False)
    first = jnp.argmax(first_logprobs).astype(jnp.int32)
    later = self.compiled(f"generate{max_new_tokens}",
                          greedy_generation_fn(self.config, max_new_tokens - 1),
                          self.params, cache, first, keep, token)
    tokens_MS = np.concatenate([np.full((len(self.methods), 1), int(first)), np.asarray(later)],
                               axis=1)
    tracker = StopTracker(len(self.methods), eos_ids, stop_strings, tokenizer, None)
    for step in range(max_new_tokens):
      if tracker.add(tokens_MS[:, step]):
        break
    results = tracker.results([len(prompt_ids)] * len(self.methods))
    return {p.name: r for p, r in zip(self.methods, results)}

  def score(self, context_ids: Sequence[int], continuations: Sequence[Sequence[int]],
            with_kl: bool = False) -> Dict[str, ContinuationScores]:
    """Per policy name, the scores of each continuation (token ids, at least
    one each) after `context_ids`. `with_kl` also measures, per token, the KL
    divergence of the dense model's next-token distribution to the policy's."""
    if not context_ids:
      raise ValueError("a context must have at least one token")
    if any(len(c) < 1 for c in continuations):
      raise ValueError("every continuation must have at least one token")
    bucket, T = self.layout(len(context_ids), max(len(c) for c in continuations))
    first_logprobs, cache, keep, cluster_ids, token = self._prefill(context_ids, bucket, with_kl)
    C = len(continuations)
    inputs, targets = np.zeros((C, T), np.int32), np.zeros((C, T), np.int32)
    for c, ids in enumerate(continuations):
      inputs[c, :len(ids) - 1] = ids[:-1]
      targets[c, :len(ids) - 1] = ids[1:]
    lengths = np.array([len(ids) for ids in continuations])
    first_ids = jnp.asarray([ids[0] for ids in continuations], jnp.int32)
    first = first_logprobs[first_ids]
    first_greedy = first_ids == jnp.argmax(first_logprobs)
    reference = self._kl_reference if with_kl else None
    out = self.compiled("score_kl" if with_kl else "score", continuation_fn(self.config, reference),
                        self.params, cache, jnp.asarray(inputs), jnp.asarray(targets), keep,
                        token)
    out, first, first_greedy, cluster_ids = jax.device_get((out, first, first_greedy, cluster_ids))
    M = len(cluster_ids)
    valid_CT = np.arange(1 + T)[None, :] < lengths[:, None]   # the first token, then T scored
    token_logprobs = np.concatenate([np.broadcast_to(first[None, :, None], (M, C, 1)),
                                     out["logprob"]], axis=-1)
    sums = np.where(valid_CT, token_logprobs.astype(np.float64), 0.0).sum(-1)
    greedy = first_greedy[None] & np.all(np.where(valid_CT[:, 1:], out["greedy"] > 0, True), -1)
    token_kl = (np.concatenate([np.zeros((M, C, 1), np.float32), out["kl"]], axis=-1) if with_kl
                else None)
    return {p.name: ContinuationScores(
        sums[m], greedy[m], token_logprobs[m], lengths, None if token_kl is None else token_kl[m],
        None if cluster_ids[m] < 0 else int(cluster_ids[m]))
        for m, p in enumerate(self.methods)}
