"""Text generation: bucketed prefill, a compiled-once decode step, stopping.

Prompts are left-padded to the smallest length bucket that fits, so that a
(batch, bucket, cache length) triple compiles its prefill once, and the decode
step (which attends over the whole fixed-length cache) compiles once per
(batch, cache length) and parameter shapes. Functions are compiled ahead of
time through `CompiledFunctions`, which counts compilations and their time so
that compile time is never hidden in a throughput figure.

Sparse decoding (a `CoreSpec`): the prefill also returns each sparsified
layer's core neurons, a compiled gather (once per shape) copies their rows, and
the same decode step runs on the compact FFNs, compiled once per (batch, k,
cache length) whatever the prompt or its core set. Similarity-guided decoding
(`ClusterArtefacts`): the prefill selects at the clustering layer only, the
nearest cluster is chosen, and decoding runs on that cluster's compact FFNs,
gathered once per cluster (`similarity.ClusterFFNs`).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from coreinfer_jax import gather, model, selection, similarity
from coreinfer_jax.artefacts import ClusterArtefacts
from coreinfer_jax.cache import KVCache, init_cache
from coreinfer_jax.config import ModelConfig
from coreinfer_jax.core import CoreSpec
from coreinfer_jax.params import ModelParams
from coreinfer_jax.sampling import SamplingConfig, sample

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def default_dtype():
  """float32 on CPU (bfloat16 matmuls are slow on XLA:CPU), bfloat16 elsewhere."""
  return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def _shape_key(args) -> Tuple:
  leaves, treedef = jax.tree_util.tree_flatten(args)
  return treedef, tuple((a.shape, a.dtype) for a in leaves)


def _same_shapes(a, b) -> bool:
  return _shape_key(a) == _shape_key(b)


class CompiledFunctions:
  """Ahead-of-time compilation, once per (function name, argument shapes)."""

  def __init__(self):
    self._executables: Dict[Tuple, Any] = {}
    self.compiles: collections.Counter = collections.Counter()
    self.compile_seconds: collections.Counter = collections.Counter()
    self.warm_up_seconds = 0.0   # first runs of new executables, compilation excluded

  def has(self, name: str, *args) -> bool:
    return (name, _shape_key(args)) in self._executables

  def get(self, name: str, fn: Callable, *args, donate_argnums: Tuple[int, ...] = ()):
    """The executable for these argument shapes (arrays or ShapeDtypeStructs)."""
    key = (name, _shape_key(args))
    executable = self._executables.get(key)
    if executable is None:
      t0 = time.perf_counter()
      # keep_unused: a donated argument that is only an output buffer must not be pruned.
      executable = jax.jit(fn, donate_argnums=donate_argnums, keep_unused=bool(donate_argnums)
                           ).lower(*args).compile()
      self.compile_seconds[name] += time.perf_counter() - t0
      self.compiles[name] += 1
      self._executables[key] = executable
    return executable

  def __call__(self, name: str, fn: Callable, *args, donate_argnums: Tuple[int, ...] = ()):
    return self.get(name, fn, *args, donate_argnums=donate_argnums)(*args)


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


@dataclasses.dataclass
class GenerationResult:
  token_ids: List[int]
  text: Optional[str]
  prompt_tokens: int
  finish_reason: str        # "eos", "stop_string" or "length"


@dataclasses.dataclass
class GenerationStats:
  prefill_seconds: float = 0.0   # dense prefill + core selection + gather
  gather_seconds: float = 0.0
  # Core selection runs inside the prefill; with `Generator.time_selection` it
  # is measured as this prefill minus a dense prefill of the same input.
  select_seconds: Optional[float] = None
  ffn_bytes_fraction: float = 1.0   # FFN weight bytes per decode token, sparse over dense
  decode_weight_bytes: float = 0.0  # all weight bytes one sequence's decode token reads
  decode_seconds: float = 0.0
  decode_steps: int = 0     # decode-step calls (each yields one token per sequence)
  cluster_ids: Optional[List[int]] = None   # similarity-guided: each sequence's cluster

  @property
  def decode_tokens_per_second(self) -> float:
    return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0


def prefill_fn(config: ModelConfig, cache_len: int, sampling: SamplingConfig,
               core: Optional[CoreSpec] = None):
  """(params, tokens [B, T], start [B], key) -> (first new token [B], cache,
  per layer core neurons int32 [B, k] or None). Dense, with `core`'s
  selection computed from the FFN values inside the same pass."""
  select = selection.layer_selector(core, relu=not config.is_llama) if core else None

  def prefill(params: ModelParams, tokens_BT, start_B, key):
    cache = init_cache(config, tokens_BT.shape[0], cache_len, start_B, params.embed_VE.dtype)
    logits, cache, core_neurons = model.forward_with_core(
        params, config, cache, tokens_BT, select, last_only=True)
    first = sample(logits[:, 0], jax.random.fold_in(key, cache.length), sampling)
    return first, cache, core_neurons
  return prefill


def decode_fn(config: ModelConfig, sampling: SamplingConfig):
  """(params, cache, tokens [B], key) -> (next token [B], cache)."""
  def decode_step(params: ModelParams, cache: KVCache, tokens_B, key):
    logits, cache = model.forward(params, config, cache, tokens_B[:, None])
    return sample(logits[:, 0], jax.random.fold_in(key, cache.length), sampling), cache
  return decode_step


def eos_ids(config: ModelConfig, tokenizer=None) -> Tuple[int, ...]:
  """The ids that end a sequence: the config's and the tokenizer's."""
  eos = list(config.eos_token_ids)
  if tokenizer is not None and tokenizer.eos_token_id is not None:
    eos.append(tokenizer.eos_token_id)
  return tuple(sorted(set(eos)))


class StopTracker:
  """Host-side bookkeeping of each sequence's tokens and stop conditions."""

  def __init__(self, batch: int, eos_ids: Sequence[int], stop_strings: Sequence[str], tokenizer,
               on_text: Optional[Callable[[int, str], None]]):
    if (stop_strings or on_text) and tokenizer is None:
      raise ValueError("stop strings and streaming need a tokenizer")
    self.tokens: List[List[int]] = [[] for _ in range(batch)]
    self.reasons: List[Optional[str]] = [None] * batch
    self.texts: List[str] = [""] * batch
    self._eos = set(eos_ids)
    self._stops = tuple(stop_strings)
    self._tokenizer = tokenizer
    self._on_text = on_text

  def _text(self, b: int) -> str:
    return self._tokenizer.decode(self.tokens[b], skip_special_tokens=True)

  def add(self, new_tokens_B: np.ndarray) -> bool:
    """Records one token per live sequence; True when all have stopped."""
    for b, token in enumerate(new_tokens_B.tolist()):
      if self.reasons[b] is not None:
        continue
      if token in self._eos:
        self.reasons[b] = "eos"
        continue
      self.tokens[b].append(token)
      if self._tokenizer is None:
        continue
      text = self._text(b)
      for stop in self._stops:
        cut = text.find(stop)
        if cut >= 0:
          text, self.reasons[b] = text[:cut], "stop_string"
      # Hold back a trailing replacement char: a multi-byte character may be incomplete.
      stable = text if self.reasons[b] else text.rstrip("\ufffd")
      if self._on_text and len(stable) > len(self.texts[b]):
        self._on_text(b, stable[len(self.texts[b]):])
      self.texts[b] = stable if len(stable) >= len(self.texts[b]) else self.texts[b]
    return all(r is not None for r in self.reasons)

  def results(self, prompt_lens: Sequence[int]) -> List[GenerationResult]:
    out = []
    for b, n in enumerate(prompt_lens):
      text = None
      if self._tokenizer is not None:
        text = self.texts[b] if self.reasons[b] == "stop_string" else self._text(b)
      out.append(GenerationResult(self.tokens[b], text, n, self.reasons[b] or "length"))
    return out


@dataclasses.dataclass
class Prefilled:
  """What a prefill hands to decoding."""
  tokens_B: jax.Array            # the first new token of each sequence
  cache: KVCache
  decode_params: ModelParams     # the parameters, with gathered FFNs when sparse
  core: gather.CoreIndices       # per layer int32 [B, k], or None (dense layer)
  cluster_ids: Optional[np.ndarray] = None   # int32 [B], similarity-guided decoding


class Generator:
  """Generates from a fixed set of parameters with one compiled step per shape.

  With `core` (a `CoreSpec`), the prefill also selects each sparsified layer's
  core neurons, one compiled gather copies their rows, and decoding runs on
  those compact FFNs: the decode step compiles once per (batch, k, cache
  length) and serves every later prompt. With `clusters` instead, decoding
  runs on the prompt's nearest cluster's core neurons (`core` is then the
  artefacts' own spec); `preload_clusters` gathers every cluster up front.
  """

  def __init__(self, config: ModelConfig, params: ModelParams, tokenizer=None, *,
               cache_len: int = 1024, buckets: Sequence[int] = DEFAULT_BUCKETS,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
               core: Optional[CoreSpec] = None, clusters: Optional[ClusterArtefacts] = None,
               preload_clusters: bool = False, time_selection: bool = False):
    if config.sliding_window and cache_len > config.sliding_window:
      raise ValueError(f"cache_len {cache_len} exceeds the model's sliding window "
                       f"{config.sliding_window}, which is not implemented")
    if clusters is not None:
      core = clusters.spec
    if core is not None and len(core.layer_k) != config.num_layers:
      raise ValueError(f"core spec for {len(core.layer_k)} layers, model has {config.num_layers}")
    self.config = config
    self.params = params
    self.tokenizer = tokenizer
    self.cache_len = cache_len
    self.buckets = tuple(sorted(buckets))
    self.sampling = sampling
    self.core = core
    self.time_selection = time_selection and core is not None
    self.key = jax.random.key(seed)
    self.compiled = CompiledFunctions()
    self._recycled = None
    self.clusters = None if clusters is None else similarity.ClusterFFNs(clusters, self.compiled)
    if preload_clusters and self.clusters:
      self.clusters.preload(params)
    selecting = core if clusters is None else similarity.prefill_spec(clusters)
    self._prefill = prefill_fn(config, cache_len, sampling, selecting)
    self._dense_prefill = prefill_fn(config, cache_len, sampling)
    self._decode = decode_fn(config, sampling)
    self.eos_ids = eos_ids(config, tokenizer)

  def encode(self, prompt: str, chat: bool = False) -> List[int]:
    if chat:
      return list(self.tokenizer.apply_chat_template(
          [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
          return_dict=True)["input_ids"])
    return list(self.tokenizer(prompt)["input_ids"])

  def bucket(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    return pick_bucket(max(len(p) for p in prompt_ids), max_new_tokens, self.cache_len, self.buckets)

  def pad(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> Tuple[jax.Array, jax.Array]:
    tokens, start = left_pad(prompt_ids, self.bucket(prompt_ids, max_new_tokens))
    return jnp.asarray(tokens), jnp.asarray(start)

  def prefill_padded(self, params: ModelParams, tokens_BT: jax.Array, start_B: jax.Array):
    """(first tokens [B], cache, core neurons): the compiled prefill, selecting."""
    return self.compiled("prefill", self._prefill, params, tokens_BT, start_B, self.key)

  def dense_prefill_padded(self, params: ModelParams, tokens_BT: jax.Array, start_B: jax.Array):
    """The same prefill without selection (to measure what selection costs)."""
    return self.compiled("dense_prefill", self._dense_prefill, params, tokens_BT, start_B, self.key)

  def decode_params(self, params: ModelParams, core: gather.CoreIndices,
                    recycled: Optional[Tuple] = None) -> Tuple[ModelParams, Optional[np.ndarray]]:
    """(`params` with each sparsified layer's FFN gathered down to its core
    rows, cluster ids or None). Stability: gathered into `recycled` (a finished
    sentence's compact FFNs, see `recycle`) or new buffers. Similarity: the
    nearest cluster's kept FFNs."""
    if self.core is None:
      return params, None
    if self.clusters is not None:
      ids = self.clusters.assign(core)
      return self.clusters.decode_params(params, ids.tolist()), ids
    shapes = jax.eval_shape(gather.gather_core, params, core)
    if recycled is None or not _same_shapes(recycled, shapes):
      recycled = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    compact = self.compiled("gather", gather.gather_core_into, params, core, recycled,
                            donate_argnums=(2,))
    return gather.with_compact_ffn(params, compact), None

  def recycle(self, state: Prefilled) -> None:
    """Hands back a sentence's gathered FFNs once its decoding is over: the
    next `timed_prefill` gathers into them. `state` must not be used again."""
    if self.core is not None and self.clusters is None:
      self._recycled = tuple(layer.ffn if k is not None else None
                             for layer, k in zip(state.decode_params.layers, self.core.layer_k))

  def prefill(self, params: ModelParams, prompt_ids: Sequence[Sequence[int]],
              max_new_tokens: int) -> Prefilled:
    """Pads, runs the compiled prefill and, when sparse, the gather."""
    tokens, cache, core = self.prefill_padded(params, *self.pad(prompt_ids, max_new_tokens))
    decode_params, cluster_ids = self.decode_params(params, core)
    return Prefilled(tokens, cache, decode_params, core, cluster_ids)

  def decode(self, params: ModelParams, cache: KVCache, tokens_B: jax.Array):
    return self.compiled("decode", self._decode, params, cache, tokens_B, self.key,
                         donate_argnums=(1,))

  def compile_for(self, params: ModelParams, batch: int, bucket: int) -> None:
    """Compiles prefill, gather and decode for these shapes, and runs each once
    on dummy input: an executable's first run pays one-time costs (~1 s on
    XLA:CPU) that belong to compilation, not to the prefill or decode timed."""
    tokens = jnp.zeros((batch, bucket), jnp.int32)
    start = jnp.zeros((batch,), jnp.int32)
    if self.compiled.has("prefill", params, tokens, start, self.key):
      return
    t0 = time.perf_counter()
    compile_before = sum(self.compiled.compile_seconds.values())
    first, cache, core = self.prefill_padded(params, tokens, start)
    decode_params, cluster_ids = self.decode_params(params, core)
    state = Prefilled(first, cache, decode_params, core, cluster_ids)
    jax.block_until_ready(self.decode(state.decode_params, state.cache, state.tokens_B))
    self.recycle(state)   # the first real prompt gathers into these buffers
    if self.time_selection:
      jax.block_until_ready(self.dense_prefill_padded(params, tokens, start))
    compiled = sum(self.compiled.compile_seconds.values()) - compile_before
    self.compiled.warm_up_seconds += time.perf_counter() - t0 - compiled

  def timed_prefill(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                     stats: GenerationStats) -> Prefilled:
    """The prefill and gather, timed into `stats` (compile first: `compile_for`)."""
    tokens_BT, start_B = self.pad(prompt_ids, max_new_tokens)
    t0 = time.perf_counter()
    tokens, cache, core = jax.block_until_ready(self.prefill_padded(self.params, tokens_BT, start_B))
    selecting_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    recycled, self._recycled = self._recycled, None
    decode_params, cluster_ids = jax.block_until_ready(
        self.decode_params(self.params, core, recycled))
    stats.gather_seconds = time.perf_counter() - t0
    stats.prefill_seconds = selecting_seconds + stats.gather_seconds
    stats.ffn_bytes_fraction = gather.ffn_bytes_fraction(self.params, decode_params)
    stats.decode_weight_bytes = gather.decode_weight_bytes_per_sequence(self.params, decode_params)
    if self.time_selection:
      t0 = time.perf_counter()
      jax.block_until_ready(self.dense_prefill_padded(self.params, tokens_BT, start_B))
      stats.select_seconds = selecting_seconds - (time.perf_counter() - t0)
    stats.cluster_ids = None if cluster_ids is None else cluster_ids.tolist()
    return Prefilled(tokens, cache, decode_params, core, cluster_ids)

  def generate_ids(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                   stop_strings: Sequence[str] = (),
                   on_text: Optional[Callable[[int, str], None]] = None,
                   ) -> Tuple[List[GenerationResult], GenerationStats]:
    stats = GenerationStats()
    tracker = StopTracker(len(prompt_ids), self.eos_ids, stop_strings, self.tokenizer, on_text)
    self.compile_for(self.params, len(prompt_ids), self.bucket(prompt_ids, max_new_tokens))
    state = self.timed_prefill(prompt_ids, max_new_tokens, stats)
    tokens, cache = state.tokens_B, state.cache

    t0 = time.perf_counter()
    for _ in range(max_new_tokens - 1):
      # Dispatch step n+1 before reading token n on the host, so the host's
      # bookkeeping overlaps the device's work.
      next_tokens, cache = self.decode(state.decode_params, cache, tokens)
      stats.decode_steps += 1
      if tracker.add(np.asarray(tokens)):
        break
      tokens = next_tokens
    else:
      tracker.add(np.asarray(tokens))
    jax.block_until_ready(cache)
    stats.decode_seconds = time.perf_counter() - t0
    self.recycle(state)
    return tracker.results([len(p) for p in prompt_ids]), stats

  def generate(self, prompts: Sequence[str], max_new_tokens: int, chat: bool = False, **kwargs):
    return self.generate_ids([self.encode(p, chat) for p in prompts], max_new_tokens, **kwargs)
