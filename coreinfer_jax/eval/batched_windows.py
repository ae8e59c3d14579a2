"""Perplexity of windows decoded B at a time: what a batch's core sets cost.

`ContinuationScorer` prefills one context at a time, so each window has its
own core set. Batched decoding can instead share one set over the batch
(`CoreSpec.shared`); its quality cost shows only when the windows of one
batch are prefilled together. Here B windows (equal context lengths, so no
padding) are prefilled in one selecting pass; each sequence's continuation
is then scored as `eval.scorer` does: the first token by the dense prefill's
last logits, the rest teacher-forced over the cache with the FFN keeping
only the core neurons of that sequence's set (`MaskedFFN`), per sequence or
the batch's one set.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from coreinfer_jax.core.policy import CorePolicy, selection_tap
from coreinfer_jax.eval.scorer import TokenRows, keep_mask, masked_params, token_rows
from coreinfer_jax.eval.tasks import Window
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.forward import forward
from coreinfer_jax.model.params import ModelParams
from coreinfer_jax.runtime.prefill import prefill


def batch_logprob_fn(config: ModelConfig, cache_len: int, policy: CorePolicy):
  """(params, contexts int32 [B, T], continuations int32 [B, C], policy
  arrays, the policy's `TokenRows` or None) -> float32 [B]: each
  continuation's summed log-probability."""
  tap = selection_tap(config.num_layers, [policy])

  def run(params: ModelParams, contexts_BT, continuations_BC, arrays,
          token: Optional[TokenRows]):
    B = contexts_BT.shape[0]
    logits_BV, cache, rankings = prefill(params, config, contexts_BT, jnp.zeros((B,), jnp.int32),
                                         tap, cache_len)
    core, _ = policy.core_sets(rankings, arrays, B)
    first_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1),
                                  continuations_BC[:, :1], axis=-1)[:, 0]
    keep = tuple(keep_mask(c, B, config.intermediate_size) for c in core)
    token = None if token is None else token.repeat(B)
    logits, _ = forward(masked_params(params, keep, token), config, cache,
                        continuations_BC[:, :-1])
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    rest_B = jnp.sum(jnp.take_along_axis(logprobs, continuations_BC[:, 1:, None], axis=-1),
                     axis=(1, 2))
    return first_B + rest_B
  return run


def batched_perplexity(params: ModelParams, config: ModelConfig, policies: Sequence[CorePolicy],
                       windows: Sequence[Window], batch: int, cache_len: int,
                       progress: bool = True) -> Dict[str, float]:
  """Per policy name, the per-token perplexity of the windows' continuations
  when `batch` consecutive windows are prefilled and decoded together."""
  if batch < 1 or len(windows) % batch:
    raise ValueError(f"{len(windows)} windows do not split into batches of {batch}")
  if len({len(w.context) for w in windows}) != 1 or len({len(w.continuation) for w in windows}) != 1:
    raise ValueError("batched windows need equal context and continuation lengths")
  if len(windows[0].context) + len(windows[0].continuation) > cache_len:
    raise ValueError(f"a window of {len(windows[0].context) + len(windows[0].continuation)} "
                     f"tokens does not fit the cache of {cache_len}")
  contexts = np.asarray([w.context for w in windows], np.int32)
  continuations = np.asarray([w.continuation for w in windows], np.int32)
  perplexity = {}
  for policy in policies:
    fn = jax.jit(batch_logprob_fn(config, cache_len, policy))
    arrays, token = policy.arrays(), token_rows([policy], config.num_layers)
    total = 0.0
    for start in tqdm(range(0, len(windows), batch), desc=policy.name, disable=not progress):
      part = slice(start, start + batch)
      total += float(np.sum(np.asarray(fn(params, contexts[part], continuations[part], arrays,
                                          token),
                                       np.float64)))
    perplexity[policy.name] = math.exp(-total / continuations.size)
  return perplexity
