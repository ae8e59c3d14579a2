"""Log-likelihood of continuations as sparse decoding would produce them.

The evaluation trap (GUIDE §1): one dense forward pass over context +
continuation never decodes, so it scores a prefill-dense method exactly like
the dense model. Here, as in decoding:
1. the context is prefilled densely (bucketed, left-padded), and that pass
   selects each method's core neurons;
2. the continuation's first token is scored by the prefill's last logits
   (decoding samples it from those, dense);
3. every later continuation token is scored by one teacher-forced pass over
   the continuation with the context's KV cache, each method dropping its
   non-core neurons (h[i] = 0: what decoding on the FFN rows gathered down to
   the core set computes, equal to step-by-step sparse decoding to float
   rounding; exactly dense at β = 1).

One prefill and one batched pass serve every method: each method's selection
runs inside the prefill (`multi_selector`), sharing each layer's ranking
statistics per scoring, and each (method, choice) is a row of the pass, so
the weights are read once per context rather than once per method.

Greedy generation for evaluation (`ContinuationScorer.generate`) works the
same way: one dense prefill per prompt, then every method decodes as one row
of a batch (a `lax.scan` over a fixed number of steps), dropping its non-core
neurons; stop strings and EOS are applied on the host afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from coreinfer_jax import model, selection, similarity
from coreinfer_jax.artefacts import ClusterArtefacts
from coreinfer_jax.cache import KVCache, init_cache
from coreinfer_jax.config import ModelConfig
from coreinfer_jax.core import CoreSpec
from coreinfer_jax.generation import (DEFAULT_BUCKETS, CompiledFunctions, GenerationResult,
                                      StopTracker, left_pad, pick_bucket)
from coreinfer_jax.params import ModelParams

CONTINUATION_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024)


@dataclasses.dataclass(eq=False)
class Method:
  """One decoding configuration: dense (`spec` None), stability-guided
  (`spec`), or similarity-guided (`clusters`, whose spec is `spec`)."""
  name: str
  spec: Optional[CoreSpec] = None
  clusters: Optional[ClusterArtefacts] = None
  kind: str = "dense"          # dense | stability | similarity | beta_file
  family: str = ""             # a curve of the frontier plot (the name without β)

  @property
  def selecting_spec(self) -> Optional[CoreSpec]:
    """What the prefill must select for this method."""
    if self.clusters is not None:
      return similarity.prefill_spec(self.clusters)
    return self.spec

  def summary(self) -> dict:
    record = {"method": self.name, "kind": self.kind, "family": self.family or self.name}
    if self.spec is not None:
      record.update(self.spec.summary())
    return record


def multi_selector(specs: Sequence[CoreSpec], relu: bool) -> model.CoreSelector:
  """A selector returning, per layer, a tuple with each spec's core neurons
  ([B, k] or None). The ranking keys are computed once per (scoring, α) and
  sorted once for the largest k: a smaller k's set is a prefix of that order,
  so each spec gets exactly what its own `selection.select_core` returns."""
  def select(layer: int, values_BTF: jax.Array, real_BT: jax.Array):
    ranked: Dict[Tuple[str, float], jax.Array] = {}
    wanted: Dict[Tuple[str, float], int] = {}
    for spec in specs:
      if spec.layer_k[layer] is not None:
        key = (spec.scoring, spec.alpha)
        wanted[key] = max(wanted.get(key, 0), spec.layer_k[layer])
    for (scoring, alpha), k in wanted.items():
      keys = selection.core_statistics(values_BTF, real_BT, scoring=scoring, alpha=alpha, relu=relu)
      ranked[(scoring, alpha)] = selection.rank_neurons(k, *keys)
    return tuple(None if spec.layer_k[layer] is None
                 else ranked[(spec.scoring, spec.alpha)][:, :spec.layer_k[layer]] for spec in specs)
  return select


def tile_cache(cache: KVCache, batch: int) -> KVCache:
  """A batch-1 cache repeated for `batch` continuations of the same context."""
  tile = lambda a: jnp.broadcast_to(a, (batch,) + a.shape[1:])
  return cache.replace(k=tuple(map(tile, cache.k)), v=tuple(map(tile, cache.v)),
                       start_B=tile(cache.start_B))


def keep_masks(num_neurons: int, cores: Tuple[Tuple[Optional[jax.Array], ...], ...]):
  """Per layer float32 [M, F]: row m keeps method m's core neurons (int32 [k])
  at that layer, or every neuron where the method leaves the layer dense."""
  ones = jnp.ones((num_neurons,), jnp.float32)
  zeros = jnp.zeros((num_neurons,), jnp.float32)
  return tuple(jnp.stack([ones if layer is None else zeros.at[layer].set(1.0) for layer in per_layer])
               for per_layer in zip(*cores))


def continuation_fn(config: ModelConfig, reference: Optional[int]):
  """(params, batch-1 cache, inputs int32 [C, T], targets int32 [C, T], per
  layer keep masks [M, F]) -> per method m and continuation c, float32
  [M, C, T]: `logprob` of each target and `greedy` (target is the argmax);
  with `reference` (a method index), `kl`: the KL divergence of that method's
  next-token distribution to each method's. All M·C rows run as one batch over
  the context's cache; a method's row drops its non-core neurons (h[i] = 0),
  which is what decoding on its gathered FFNs computes."""
  def score(params: ModelParams, cache: KVCache, inputs_CT, targets_CT, keep):
    M, (C, T) = keep[0].shape[0], inputs_CT.shape
    rows = M * C
    keep_rows = tuple(jnp.repeat(k_MF, C, axis=0) for k_MF in keep)
    logits, _ = model.forward(params, config, tile_cache(cache, rows), jnp.tile(inputs_CT, (M, 1)),
                              ffn_keep=keep_rows)
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
  """(params, batch-1 cache, first token int32 [], per layer keep masks [M, F])
  -> int32 [M, steps]: each method's greedy tokens after the first, every
  method a row of one batch over the prompt's cache (as `continuation_fn`)."""
  def generate(params: ModelParams, cache: KVCache, first, keep):
    M = keep[0].shape[0]
    def step(carry, _):
      cache, tokens_M = carry
      logits, cache = model.forward(params, config, cache, tokens_M[:, None], ffn_keep=keep)
      tokens_M = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
      return (cache, tokens_M), tokens_M
    _, tokens_SM = jax.lax.scan(step, (tile_cache(cache, M), jnp.full((M,), first, jnp.int32)),
                                None, length=steps)
    return tokens_SM.T
  return generate


def prefill_fn(config: ModelConfig, cache_len: int, specs: Tuple[CoreSpec, ...]):
  """(params, tokens [1, T], start [1]) -> (last-position log-probabilities
  [1, V], cache, per spec a tuple of per-layer core neurons [1, k] or None)."""
  select = multi_selector(specs, relu=not config.is_llama) if specs else None

  def prefill(params: ModelParams, tokens_BT, start_B):
    cache = init_cache(config, tokens_BT.shape[0], cache_len, start_B, params.embed_VE.dtype)
    logits, cache, per_layer = model.forward_with_core(params, config, cache, tokens_BT, select,
                                                       last_only=True)
    per_spec = tuple(tuple(layer[s] if layer is not None else None for layer in per_layer)
                     for s in range(len(specs)))
    return jax.nn.log_softmax(logits[:, 0], axis=-1), cache, per_spec
  return prefill


@dataclasses.dataclass
class ContinuationScores:
  """One method's scores of a context's continuations (host arrays)."""
  logprob_sums: np.ndarray       # float64 [C]: sum of the continuation's token log-probabilities
  greedy: np.ndarray             # bool [C]: every token was the argmax
  token_logprobs: List[np.ndarray]   # per continuation, float32 [n_c]
  token_kl: Optional[List[np.ndarray]] = None   # per continuation, KL of dense to it per token [n_c]
  cluster_id: Optional[int] = None


class ContinuationScorer:
  """Scores continuations of a context under several methods with one dense
  prefill and one batched pass. Sizes are bucketed so that executables
  repeat: a context pads to a bucket of `buckets`, continuations to one of
  `continuation_buckets`, and the cache holds `cache_len` slots every call."""

  def __init__(self, config: ModelConfig, params: ModelParams, methods: Sequence[Method], *,
               cache_len: int = 1024, buckets: Sequence[int] = DEFAULT_BUCKETS,
               continuation_buckets: Sequence[int] = CONTINUATION_BUCKETS):
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
      raise ValueError(f"method names repeat: {names}")
    self.config = config
    self.params = params
    self.methods = tuple(methods)
    self.cache_len = cache_len
    self.buckets = tuple(sorted(buckets))
    self.continuation_buckets = tuple(sorted(continuation_buckets))
    self.compiled = CompiledFunctions()
    selecting = [m for m in self.methods if m.selecting_spec is not None]
    self._spec_index = {m.name: i for i, m in enumerate(selecting)}
    self._prefill = prefill_fn(config, cache_len, tuple(m.selecting_spec for m in selecting))
    self._masks = functools.partial(keep_masks, config.intermediate_size)
    self._centroids = {m.name: jnp.asarray(m.clusters.centroids_CF) for m in self.methods
                       if m.clusters is not None}

  def _core(self, method: Method, cores) -> Tuple[Tuple[Optional[jax.Array], ...], Optional[int]]:
    """(per layer the method's core set int32 [k] or None, cluster id or None)."""
    if method.spec is None:
      return tuple(None for _ in range(self.config.num_layers)), None
    core = cores[self._spec_index[method.name]]
    if method.clusters is None:
      return tuple(None if c is None else c[0] for c in core), None
    art = method.clusters
    cluster = int(self.compiled("assign", similarity.nearest_cluster, self._centroids[method.name],
                                core[art.cluster_layer])[0])
    return tuple(None if s is None else jnp.asarray(s[cluster]) for s in art.layer_sets), cluster

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

  def _keep(self, cores, methods: Sequence[Method]):
    """(per layer keep masks [M, F], each method's cluster id or None)."""
    per_method = [self._core(m, cores) for m in methods]
    return (self.compiled("masks", self._masks, tuple(core for core, _ in per_method)),
            [cluster for _, cluster in per_method])

  def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, *, eos_ids: Sequence[int] = (),
               stop_strings: Sequence[str] = (), tokenizer=None) -> Dict[str, GenerationResult]:
    """Per method name, the greedy completion of `prompt_ids` as that method
    decodes it (the first token from the dense prefill), cut at EOS and at the
    first stop string; `max_new_tokens` decode steps always run."""
    if not prompt_ids:
      raise ValueError("a prompt must have at least one token")
    bucket = pick_bucket(len(prompt_ids), max_new_tokens, self.cache_len, self.buckets)
    tokens, start = left_pad([prompt_ids], bucket)
    first_logprobs, cache, cores = self.compiled("prefill", self._prefill, self.params,
                                                 jnp.asarray(tokens), jnp.asarray(start))
    first = jnp.argmax(first_logprobs[0]).astype(jnp.int32)
    keep, _ = self._keep(cores, self.methods)
    later = self.compiled(f"generate{max_new_tokens}", greedy_generation_fn(self.config, max_new_tokens - 1),
                          self.params, cache, first, keep)
    tokens_MS = np.concatenate([np.full((len(self.methods), 1), int(first)), np.asarray(later)], axis=1)
    tracker = StopTracker(len(self.methods), eos_ids, stop_strings, tokenizer, None)
    for step in range(max_new_tokens):
      if tracker.add(tokens_MS[:, step]):
        break
    results = tracker.results([len(prompt_ids)] * len(self.methods))
    return {m.name: r for m, r in zip(self.methods, results)}

  def score(self, context_ids: Sequence[int], continuations: Sequence[Sequence[int]],
            with_kl: bool = False) -> Dict[str, ContinuationScores]:
    """Per method name, the scores of each continuation (token ids, at least
    one each) after `context_ids`. `with_kl` also measures, per token, the KL
    divergence of the dense model's next-token distribution to the method's."""
    if not context_ids:
      raise ValueError("a context must have at least one token")
    if any(len(c) < 1 for c in continuations):
      raise ValueError("every continuation must have at least one token")
    longest = max(len(c) for c in continuations)
    bucket, T = self.layout(len(context_ids), longest)
    tokens, start = left_pad([context_ids], bucket)
    first_logprobs, cache, cores = self.compiled("prefill", self._prefill, self.params,
                                                 jnp.asarray(tokens), jnp.asarray(start))
    first_logprobs = np.asarray(first_logprobs[0])

    C = len(continuations)
    inputs = np.zeros((C, T), np.int32)
    targets = np.zeros((C, T), np.int32)
    for c, ids in enumerate(continuations):
      inputs[c, :len(ids) - 1] = ids[:-1]
      targets[c, :len(ids) - 1] = ids[1:]
    first = np.array([first_logprobs[ids[0]] for ids in continuations], np.float32)
    first_greedy = np.array([ids[0] == int(np.argmax(first_logprobs)) for ids in continuations])

    methods = list(self.methods)
    reference = None
    if with_kl:
      dense = [i for i, m in enumerate(methods) if m.spec is None]
      if not dense:
        methods.append(Method("dense"))
      reference = dense[0] if dense else len(methods) - 1
    keep, clusters = self._keep(cores, methods)
    score = continuation_fn(self.config, reference)
    out = self.compiled("score" if reference is None else "score_kl", score, self.params, cache, jnp.asarray(inputs),
                        jnp.asarray(targets), keep)
    out = jax.tree_util.tree_map(np.asarray, out)
    results = {}
    for m_index, method in enumerate(self.methods):
      token_logprobs, token_kl, greedy = [], [], []
      for c, ids in enumerate(continuations):
        n = len(ids) - 1
        token_logprobs.append(np.concatenate([first[c:c + 1], out["logprob"][m_index, c, :n]]))
        greedy.append(bool(first_greedy[c]) and bool(np.all(out["greedy"][m_index, c, :n] > 0)))
        if with_kl:   # the first token comes from the dense prefill: KL 0
          token_kl.append(np.concatenate([np.zeros(1, np.float32), out["kl"][m_index, c, :n]]))
      results[method.name] = ContinuationScores(
          np.array([lp.astype(np.float64).sum() for lp in token_logprobs]), np.array(greedy),
          token_logprobs, token_kl if with_kl else None, clusters[m_index])
    return results
