"""Text generation: bucketed selecting prefill, a compiled-once decode step, stopping.

The decode step (which attends over the whole fixed-length cache) compiles
once per (batch, cache length) and parameter shapes. With a sparse policy
(`core.policy`), the compiled prefill also returns each sparsified layer's
core set, the policy's store (`core.store`) turns those into compact FFNs,
and the same decode step runs on them, compiled once per (batch, k, cache
length) whatever the prompt or its core set.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from coreinfer_jax.core import cost
from coreinfer_jax.core.gather import CoreGather, CoreSets
from coreinfer_jax.core.policy import CorePolicy, Dense, selection_tap
from coreinfer_jax.model.cache import KVCache
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.forward import UseLayer, forward
from coreinfer_jax.model.params import ModelParams
from coreinfer_jax.runtime import core_placement, lossless
from coreinfer_jax.runtime import mesh as meshes
from coreinfer_jax.runtime import offload
from coreinfer_jax.runtime import verify as verifying
from coreinfer_jax.runtime import prompts
from coreinfer_jax.runtime.batching import DEFAULT_BUCKETS, left_pad, pick_bucket
from coreinfer_jax.runtime.compile import CompiledFunctions
from coreinfer_jax.runtime.prefill import prefill
from coreinfer_jax.runtime.sampling import SamplingConfig, sample
from coreinfer_jax.runtime.stopping import GenerationResult, StopTracker, eos_ids


@dataclasses.dataclass
class GenerationStats:
  gather_seconds: float = 0.0
  # The policy's (selecting) prefill: first the prompt's own, then, with
  # `Generator.time_selection`, each further selection round's. Selection runs
  # inside the prefill, so it is only seen against a dense prefill of the same
  # input, timed after each selecting one (`dense_prefill_rounds`, else empty).
  selecting_prefill_rounds: List[float] = dataclasses.field(default_factory=list)
  dense_prefill_rounds: List[float] = dataclasses.field(default_factory=list)
  ffn_bytes_fraction: float = 1.0   # FFN weight bytes per decode token, sparse over dense
  decode_weight_bytes: float = 0.0  # all weight bytes one sequence's decode token reads
  decode_weight_bytes_per_device: float = 0.0   # what each device reads per step (whole batch)
  # On a mesh: the busiest device's core rows over a balanced share (k/devices),
  # averaged over the sparsified layers and the batch (1.0: balanced).
  core_device_load: Optional[float] = None
  # Weight bytes per device by memory (`runtime.offload.memory_record`).
  memory: Dict[str, int] = dataclasses.field(default_factory=dict)
  decode_seconds: float = 0.0
  decode_steps: int = 0     # tokens decoded per sequence after the prefill's (one per step)
  # `Generator.verify`: rounds of drafting N and verifying, each sequence's
  # accepted drafts summed over rounds, what the batch advanced by beyond the
  # dense token (summed), and the seconds of the drafts and of the verifies.
  verify_rounds: int = 0
  drafts_accepted: int = 0
  batch_accepted: int = 0
  draft_seconds: float = 0.0
  verify_seconds: float = 0.0
  refreshes: int = 0              # `Generator.refresh`: core sets re-ranked and re-gathered
  refresh_seconds: float = 0.0
  cluster_ids: Optional[List[int]] = None   # similarity-guided: each sequence's cluster

  @property
  def prefill_seconds(self) -> float:
    """The prompt's first prefill (the one whose cache decodes) + gather; the
    further timing rounds are in `selecting_prefill_rounds`."""
    if not self.selecting_prefill_rounds:
      return 0.0
    return self.selecting_prefill_rounds[0] + self.gather_seconds

  @property
  def decode_tokens_per_second(self) -> float:
    return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0

  def verify_record(self, num_draft: int, batch: int, refresh: int = 0) -> dict:
    """`runtime.verify.verify_record` of this run, and its refreshes."""
    return dict(verifying.verify_record(num_draft, batch, self.verify_rounds, self.drafts_accepted,
                                        self.batch_accepted, self.draft_seconds,
                                        self.verify_seconds),
                refresh=refresh, refreshes=self.refreshes, refresh_seconds=self.refresh_seconds)


def timed(clock: Callable[[], float], fn: Callable, *args) -> Tuple[Any, float]:
  """(fn(*args) once ready on the device, its seconds on `clock`)."""
  t0 = clock()
  out = jax.block_until_ready(fn(*args))
  return out, clock() - t0


def prefill_fn(config: ModelConfig, cache_len: int, sampling: SamplingConfig, policy: CorePolicy,
               mesh: Optional[Mesh] = None, use_layer: Optional[UseLayer] = None):
  """(params, tokens [B, T], start [B], key, policy arrays) -> (first new
  token [B], cache, per layer core set int32 [B, k] or None, the policy's
  extra outputs). Dense, with the policy's selection inside the same pass; on
  a `mesh`, the cache by KV heads and the rest replicated; `use_layer` maps
  each layer's weights as it runs (host-offloaded FFNs: into device memory)."""
  tap = meshes.replicated_tap(selection_tap(config.num_layers, [policy]), mesh)

  def run(params: ModelParams, tokens_BT, start_B, key, arrays):
    logits_BV, cache, rankings = prefill(params, config, tokens_BT, start_B, tap, cache_len,
                                         use_layer)
    core, aux = policy.core_sets(rankings, arrays, tokens_BT.shape[0])
    first = sample(logits_BV, jax.random.fold_in(key, cache.length), sampling)
    cache, (first, core, aux) = meshes.constrain_outputs(mesh, cache, (first, core, aux))
    return first, cache, core, aux
  return run


def decode_fn(config: ModelConfig, sampling: SamplingConfig, mesh: Optional[Mesh] = None):
  """(params, cache, tokens [B], key) -> (next token [B], cache)."""
  def decode_step(params: ModelParams, cache: KVCache, tokens_B, key):
    logits, cache = forward(params, config, cache, tokens_B[:, None])
    next_B = sample(logits[:, 0], jax.random.fold_in(key, cache.length), sampling)
    cache, next_B = meshes.constrain_outputs(mesh, cache, next_B)
    return next_B, cache
  return decode_step


@dataclasses.dataclass
class Prefilled:
  """What a prefill hands to decoding."""
  tokens_B: jax.Array            # the first new token of each sequence
  cache: KVCache
  decode_params: ModelParams     # the parameters, with compact FFNs when sparse
  core: CoreSets                 # per layer int32 [B, k], or None (dense layer)
  aux: Dict[str, jax.Array]      # the policy's extra outputs (e.g. "cluster_ids" [B])

  @property
  def cluster_ids(self) -> Optional[np.ndarray]:
    return None if "cluster_ids" not in self.aux else np.asarray(self.aux["cluster_ids"])


class Generator:
  """Generates from a fixed set of parameters with one compiled step per shape,
  decoding as `policy` says (default dense); `preload` prepares every
  compact FFN the policy's store can keep (similarity: every cluster's).
  `time_selection` (sparse policies) times `selection_rounds` selecting and
  dense prefills of each prompt, alternately; `clock` times the prefill, gather
  and decode (tests give a fake one). With a `mesh` (`runtime.mesh.make_mesh`),
  the parameters are placed on it by their logical axes (tensor parallel) and
  the KV cache by KV heads; every compiled function runs over the mesh.
  `offload_ffn` (sparse policies) keeps the sparsified layers' FFNs in host
  memory (`runtime.offload`), their core rows gathered on `offload_gather`
  ("device" or "host"). `verify=N` (sparse policies) decodes losslessly: the
  compact-FFN model drafts N tokens, the dense model verifies them in one
  pass (`runtime.verify`); `refresh=R` (stability) re-ranks the core sets
  every R kept tokens from the verify's dense values (`runtime.lossless`)."""

  def __init__(self, config: ModelConfig, params: ModelParams, tokenizer=None, *,
               cache_len: int = 1024, buckets: Sequence[int] = DEFAULT_BUCKETS,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
               policy: CorePolicy = Dense(), preload: bool = False, time_selection: bool = False,
               selection_rounds: int = 3, clock: Callable[[], float] = time.perf_counter,
               mesh: Optional[Mesh] = None, offload_ffn: bool = False,
               offload_gather: str = "device", verify: int = 0, refresh: int = 0):
    if policy.spec is not None and len(policy.spec.layer_k) != config.num_layers:
      raise ValueError(f"core spec for {len(policy.spec.layer_k)} layers, model has "
                       f"{config.num_layers}")
    policy.check_decoding(1 if mesh is None else mesh.size, offload_ffn, verify)
    offload.check_offload(offload_ffn, policy.spec is not None, 1 if mesh is None else mesh.size,
                          offload_gather)
    verifying.check_verify(verify, policy.spec is not None, mesh is not None, offload_ffn)
    lossless.check_refresh(refresh, verify, policy)
    policy = lossless.refreshing_policy(policy, refresh)
    self.verify = verify
    if mesh is not None:
      meshes.check_tensor_parallel(config, mesh.size)
      params = meshes.place_params(params, config, mesh)
    self.mesh = mesh
    self.offload_gather = offload_gather
    self.core_placement: Optional[str] = None   # a sparse policy on a mesh: "local" or "global"
    if mesh is not None and policy.spec is not None:
      core_gather = core_placement.MeshCoreGather(mesh, policy.spec)
      self.core_placement = core_gather.placement
    else:
      core_gather = CoreGather(shared=policy.spec is not None and policy.spec.shared)
    use_layer = None
    if offload_ffn:
      params = offload.offload_ffns(params, policy.spec)
      core_gather, use_layer = offload.HostFFNGather(core_gather, offload_gather), offload.to_device
    self.config = config
    self.params = params
    self.tokenizer = tokenizer
    self.cache_len = cache_len
    self.buckets = tuple(sorted(buckets))
    self.sampling = sampling
    self.policy = policy
    self.time_selection = time_selection and policy.spec is not None
    self.selection_rounds = selection_rounds
    self.clock = clock
    self.key = jax.random.key(seed)
    self.compiled = CompiledFunctions()
    self.store = policy.store(self.compiled, core_gather)
    self._arrays = policy.arrays()
    if preload:
      self.store.preload(params)
    self._prefill = prefill_fn(config, cache_len, sampling, policy, mesh, use_layer)
    self._dense_prefill = prefill_fn(config, cache_len, sampling, Dense(), mesh, use_layer)
    self._decode = decode_fn(config, sampling, mesh)
    self.lossless = (lossless.LosslessRounds(config, sampling, verify, refresh, policy,
                                             self.compiled, self.store, self._arrays, self.key,
                                             clock) if verify else None)
    self.eos_ids = eos_ids(config, tokenizer)

  def encode(self, prompt: str, chat: bool = False) -> List[int]:
    return prompts.encode(self.tokenizer, prompt, chat)

  def bucket(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    # verifying: the last round's draft may write N slots past the last token
    return pick_bucket(max(len(p) for p in prompt_ids), max_new_tokens + self.verify,
                       self.cache_len, self.buckets)

  def pad(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> Tuple[jax.Array, jax.Array]:
    tokens, start = left_pad(prompt_ids, self.bucket(prompt_ids, max_new_tokens))
    return jnp.asarray(tokens), jnp.asarray(start)

  def prefill_padded(self, params: ModelParams, tokens_BT: jax.Array, start_B: jax.Array):
    """(first tokens [B], cache, core sets, extra outputs): the compiled prefill."""
    return self.compiled("prefill", self._prefill, params, tokens_BT, start_B, self.key,
                         self._arrays)

  def dense_prefill_padded(self, params: ModelParams, tokens_BT: jax.Array, start_B: jax.Array):
    """The same prefill without selection (to measure what selection costs)."""
    return self.compiled("dense_prefill", self._dense_prefill, params, tokens_BT, start_B,
                         self.key, ())

  def prefill(self, params: ModelParams, prompt_ids: Sequence[Sequence[int]],
              max_new_tokens: int) -> Prefilled:
    """Pads, runs the compiled prefill and, when sparse, the store's gather."""
    return self._prefilled(params, *self.prefill_padded(params, *self.pad(prompt_ids, max_new_tokens)))

  def _prefilled(self, params: ModelParams, tokens, cache, core, aux) -> Prefilled:
    return Prefilled(tokens, cache, self.store.decode_params(params, core, aux), core, aux)

  def recycle(self, state: Prefilled) -> None:
    """Hands back a sentence's compact FFNs once its decoding is over: the
    next prefill's gather writes into them. `state` must not be used again."""
    self.store.recycle(state.decode_params)

  def decode(self, params: ModelParams, cache: KVCache, tokens_B: jax.Array):
    return self.compiled("decode", self._decode, params, cache, tokens_B, self.key,
                         donate_argnums=(1,))

  def prefill_memory(self, batch: int, bucket: int) -> Dict[str, int]:
    """XLA's memory analysis of the compiled prefill for these shapes: bytes
    of its arguments, outputs and temporaries, in device and in host memory.
    With offloaded FFNs on a GPU, `temp` tells whether each layer's copy is
    released as the layer ends (about one layer's FFN) or all stay live."""
    analysis = self.compiled.get("prefill", self._prefill, self.params,
                                 jnp.zeros((batch, bucket), jnp.int32),
                                 jnp.zeros((batch,), jnp.int32), self.key,
                                 self._arrays).memory_analysis()
    return {kind: getattr(analysis, f"{kind}_size_in_bytes")
            for kind in ("argument", "output", "temp", "host_argument", "host_temp")}

  def decode_hlo(self, params: ModelParams, cache: KVCache, tokens_B: jax.Array) -> str:
    """The compiled decode step's optimized HLO for these shapes (for profiling)."""
    return self.compiled.get("decode", self._decode, params, cache, tokens_B, self.key,
                             donate_argnums=(1,)).as_text()

  def compile_for(self, params: ModelParams, batch: int, bucket: int) -> None:
    """Compiles prefill, gather and decode for these shapes, and runs each once
    on dummy input: an executable's first run pays one-time costs (~1 s on
    XLA:CPU) that belong to compilation, not to the prefill or decode timed."""
    tokens = jnp.zeros((batch, bucket), jnp.int32)
    start = jnp.zeros((batch,), jnp.int32)
    if self.compiled.has("prefill", params, tokens, start, self.key, self._arrays):
      return
    t0 = time.perf_counter()
    compile_before = sum(self.compiled.compile_seconds.values())
    state = self._prefilled(params, *self.prefill_padded(params, tokens, start))
    if self.lossless:
      self.lossless.warm_up(params, state)
    else:
      jax.block_until_ready(self.decode(state.decode_params, state.cache, state.tokens_B))
    self.recycle(state)   # the first real prompt gathers into these buffers
    if self.time_selection:
      jax.block_until_ready(self.dense_prefill_padded(params, tokens, start))
    compiled = sum(self.compiled.compile_seconds.values()) - compile_before
    self.compiled.warm_up_seconds += time.perf_counter() - t0 - compiled

  def timed_prefill(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                    stats: GenerationStats) -> Prefilled:
    """The prefill and gather, timed into `stats` (compile first: `compile_for`);
    with `time_selection`, then the dense prefill and the selecting prefill
    again, alternately, for `selection_rounds` of each."""
    tokens_BT, start_B = self.pad(prompt_ids, max_new_tokens)
    (tokens, cache, core, aux), selecting_seconds = timed(
        self.clock, self.prefill_padded, self.params, tokens_BT, start_B)
    decode_params, stats.gather_seconds = timed(
        self.clock, self.store.decode_params, self.params, core, aux)
    stats.ffn_bytes_fraction = cost.ffn_bytes_fraction(self.params, decode_params)
    stats.decode_weight_bytes = cost.decode_weight_bytes_per_sequence(self.params, decode_params)
    stats.decode_weight_bytes_per_device = cost.decode_weight_bytes_per_device(decode_params)
    stats.memory = offload.memory_record(self.params, decode_params, self.offload_gather)
    if self.mesh is not None and self.policy.spec is not None:
      stats.core_device_load = core_placement.device_load(core, self.config.intermediate_size,
                                                          self.mesh.size)
    selecting, dense = [selecting_seconds], []
    for round_index in range(self.selection_rounds if self.time_selection else 0):
      if round_index:
        selecting.append(timed(self.clock, self.prefill_padded, self.params, tokens_BT, start_B)[1])
      dense.append(timed(self.clock, self.dense_prefill_padded, self.params, tokens_BT, start_B)[1])
    stats.selecting_prefill_rounds, stats.dense_prefill_rounds = selecting, dense
    state = Prefilled(tokens, cache, decode_params, core, aux)
    stats.cluster_ids = None if state.cluster_ids is None else state.cluster_ids.tolist()
    return state

  def generate_ids(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                   stop_strings: Sequence[str] = (),
                   on_text: Optional[Callable[[int, str], None]] = None,
                   ) -> Tuple[List[GenerationResult], GenerationStats]:
    stats = GenerationStats()
    tracker = StopTracker(len(prompt_ids), self.eos_ids, stop_strings, self.tokenizer, on_text)
    self.compile_for(self.params, len(prompt_ids), self.bucket(prompt_ids, max_new_tokens))
    state = self.timed_prefill(prompt_ids, max_new_tokens, stats)
    t0 = self.clock()
    decode = self._decode_lossless if self.lossless else self._decode_stepwise
    jax.block_until_ready(decode(state, tracker, max_new_tokens, stats))
    stats.decode_seconds = self.clock() - t0
    self.recycle(state)
    return tracker.results([len(p) for p in prompt_ids]), stats

  def _decode_stepwise(self, state: Prefilled, tracker: StopTracker, max_new_tokens: int,
                       stats: GenerationStats) -> KVCache:
    """One decode step a token until `max_new_tokens` or every sequence has
    stopped; returns the cache."""
    tokens, cache = state.tokens_B, state.cache
    for _ in range(max_new_tokens - 1):
      # Dispatch step n+1 before reading token n on the host, so the host's
      # bookkeeping overlaps the device's work.
      next_tokens, cache = self.decode(state.decode_params, cache, tokens)
      stats.decode_steps += 1
      if tracker.add(np.asarray(tokens)):
        return cache
      tokens = next_tokens
    tracker.add(np.asarray(tokens))
    return cache

  def verified_tokens(self, state: Prefilled, max_new_tokens: int,
                      stats: GenerationStats) -> Iterator[np.ndarray]:
    """Lossless decoding (`runtime.lossless`): yields each new token of the
    batch `[B]`, up to `max_new_tokens`."""
    return self.lossless.tokens(self.params, state, max_new_tokens, stats)

  def _decode_lossless(self, state: Prefilled, tracker: StopTracker, max_new_tokens: int,
                       stats: GenerationStats) -> None:
    """Lossless rounds until `max_new_tokens` or every sequence has stopped."""
    for tokens_B in self.verified_tokens(state, max_new_tokens, stats):
      if tracker.add(tokens_B):
        return

  def generate(self, prompts_text: Sequence[str], max_new_tokens: int, chat: bool = False,
               **kwargs: Any):
    return self.generate_ids([self.encode(p, chat) for p in prompts_text], max_new_tokens, **kwargs)
