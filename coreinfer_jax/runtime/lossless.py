"""Lossless decoding of a prefilled batch: draft-and-verify rounds
(`runtime.verify`), and the refresh of the core sets from verification.

`--refresh=R`: the verify pass computes the dense FFN values of the tokens it
keeps (t0 and the accepted drafts, now the dense history). Their ranking keys
(`selection.core_statistics`, sums over tokens) are added to the prompt's,
and every R kept tokens the core sets are re-ranked from the sums and
re-gathered into the same buffers: the same k, so the draft, the verify and
the gather each still compile once. The output stays exactly dense (greedy)
or dense-distributed (sampling) whatever the sets: refresh can only change
how many drafts are accepted.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import numpy as np

from coreinfer_jax.core.policy import CorePolicy, Stability
from coreinfer_jax.core.store import DenseStore
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.runtime import verify as verifying
from coreinfer_jax.runtime.compile import CompiledFunctions
from coreinfer_jax.runtime.sampling import SamplingConfig


def check_refresh(refresh: int, num_draft: int, policy: CorePolicy) -> None:
  """Refuses, in one line, a refresh that cannot run."""
  if refresh < 0:
    raise ValueError(f"--refresh must be at least 0 (0: off), got {refresh}")
  if refresh and not num_draft:
    raise ValueError("--refresh updates the core sets from the verify pass: it needs --verify")
  if refresh and not isinstance(policy, Stability):
    raise ValueError(f"--refresh re-ranks the prompt's own core sets: it needs --method=stability, "
                     f"not {policy.kind}")


def refreshing_policy(policy: CorePolicy, refresh: int) -> CorePolicy:
  """The policy whose prefill also returns the ranking keys a refresh adds to."""
  return policy.with_key_output() if refresh else policy


class LosslessRounds:
  """Draft-and-verify rounds of a `Generator` (its compiled functions, dense
  parameters, store, random key and clock), refreshing every `refresh` kept
  tokens (0: never)."""

  def __init__(self, config: ModelConfig, sampling: SamplingConfig, num_draft: int, refresh: int,
               policy: CorePolicy, compiled: CompiledFunctions, store: DenseStore,
               arrays: Any, key: jax.Array, clock: Callable[[], float]):
    self.num_draft, self.refresh = num_draft, refresh
    self.policy, self.compiled, self.store, self.arrays = policy, compiled, store, arrays
    self.key, self.clock = key, clock
    self._draft = verifying.draft_fn(config, sampling, num_draft)
    self._verify = verifying.verify_fn(config, sampling,
                                       refresh=policy.spec if refresh else None)

  def round(self, params, decode_params, cache, tokens_B, keys=None, stats=None):
    """One round: the compiled draft of N tokens with `decode_params`, then
    the compiled dense verify with `params` (and, refreshing, the running
    ranking `keys`). Returns (emitted [B, N + 1] (the first a + 1 are this
    round's), a, each sequence's accepted count [B], the next tokens [B],
    cache[, keys]); with `stats`, both calls are timed into it."""
    clock = self.clock if stats is not None else (lambda: 0.0)
    t0 = clock()
    drafts, q, cache = jax.block_until_ready(self.compiled(
        "draft", self._draft, decode_params, cache, tokens_B, self.key, donate_argnums=(1,)))
    t1 = clock()
    out = jax.block_until_ready(self.compiled("verify", self._verify, params, cache, tokens_B,
                                              drafts, q, self.key, keys, donate_argnums=(1,)))
    if stats is not None:
      stats.draft_seconds += t1 - t0
      stats.verify_seconds += clock() - t1
    return out

  def warm_up(self, params, state) -> None:
    """Compiles and runs each function once (`Generator.compile_for`)."""
    out = self.round(params, state.decode_params, state.cache, state.tokens_B,
                     state.aux.get("ranking_keys"))
    if self.refresh:
      self._refreshed(params, state, out[5])

  def tokens(self, params, state, max_new_tokens: int, stats) -> Iterator[np.ndarray]:
    """Yields each new token of the batch `[B]`: the prefill's first, then
    those of each round, up to `max_new_tokens`, counting the rounds (and
    refreshes) into `stats`. A refresh replaces `state.decode_params`."""
    tokens, cache = state.tokens_B, state.cache
    keys = state.aux.get("ranking_keys") if self.refresh else None
    yield np.asarray(tokens)
    emitted, since_refresh = 1, 0
    while emitted < max_new_tokens:
      out = self.round(params, state.decode_params, cache, tokens, keys, stats)
      _, a, accepted_B, tokens, cache = out[:5]
      a, emitted_BN1 = int(a), np.asarray(out[0])
      stats.verify_rounds += 1
      stats.batch_accepted += a
      stats.drafts_accepted += int(np.sum(accepted_B))
      for column in range(min(a + 1, max_new_tokens - emitted)):
        emitted += 1
        stats.decode_steps += 1
        yield emitted_BN1[:, column]
      if self.refresh:
        keys, since_refresh = out[5], since_refresh + a + 1
        if since_refresh >= self.refresh and emitted < max_new_tokens:
          t0 = self.clock()
          self._refreshed(params, state, keys)
          stats.refreshes += 1
          stats.refresh_seconds += self.clock() - t0
          since_refresh = 0

  def _refreshed(self, params, state, keys) -> None:
    """Re-ranks the core sets from `keys` and gathers them into the buffers
    of `state.decode_params`, which it replaces."""
    core = self.compiled("rerank", self.policy.sets_from_keys, keys, self.arrays)
    self.store.recycle(state.decode_params)
    state.decode_params = jax.block_until_ready(self.store.decode_params(params, core, state.aux))
    state.core = core
