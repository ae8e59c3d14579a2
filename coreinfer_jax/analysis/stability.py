"""The paper's first finding, measured: core neurons are *stable* through a sentence.

After a dense prefill chooses each layer's sentence core set, the model
decodes densely; at every step and layer a tap measures how many of the new
token's token-wise core neurons lie in the sentence's set, against a random
set of the same size. Returns plain numbers ready for JSON (`plots` draws them).
"""

from __future__ import annotations

from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from coreinfer_jax.core import selection
from coreinfer_jax.core.policy import Stability
from coreinfer_jax.core.spec import TOKEN_WISE_SCORINGS, CoreSpec
from coreinfer_jax.model.cache import KVCache
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.ffn import NeuronValues
from coreinfer_jax.model.forward import forward_tapped
from coreinfer_jax.model.params import ModelParams
from coreinfer_jax.offline.clustering import multi_hot
from coreinfer_jax.runtime.batching import left_pad
from coreinfer_jax.runtime.generator import prefill_fn
from coreinfer_jax.runtime.sampling import SamplingConfig


def _overlap(token_core_BF: jax.Array, reference_BF: jax.Array) -> jax.Array:
  """float32 [B]: the fraction of each token's core neurons in the reference set."""
  hits = jnp.sum(token_core_BF * reference_BF, axis=-1)
  return hits / jnp.maximum(jnp.sum(token_core_BF, axis=-1), 1)


def decode_overlap_fn(config: ModelConfig, spec: CoreSpec):
  """One greedy dense decode step that also measures, per layer, the overlap
  of this token's token-wise core neurons (top m of its own scores, m = floor(α
  · its positive count)) with the sentence's core set and with a random set.
  (params, cache, tokens [B], sentence sets, random sets: per layer float32
  [B, F] multi-hot) -> (next tokens [B], cache, overlaps [L, B], random [L, B])."""
  def step(params: ModelParams, cache: KVCache, tokens_B, sentence, random):
    def measure(layer: int, values: NeuronValues, real_BT: jax.Array):
      scores = selection.token_scores(values, spec.scoring)
      token_core = selection.token_core_counts(scores, real_BT, spec.alpha).astype(jnp.float32)
      return _overlap(token_core, sentence[layer]), _overlap(token_core, random[layer])

    logits, cache, measured = forward_tapped(params, config, cache, tokens_B[:, None], measure)
    overlaps = jnp.stack([m[0] for m in measured])
    randoms = jnp.stack([m[1] for m in measured])
    return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache, overlaps, randoms
  return step


def stability(params: ModelParams, config: ModelConfig, prompt_ids: Sequence[Sequence[int]],
              spec: CoreSpec, num_steps: int, seed: int = 0) -> Dict:
  """Generates `num_steps` tokens densely after each prompt (one batch) and
  measures, at every step and layer, the overlap of the new token's
  token-wise core neurons with the sentence core set of the prefill, against
  a random set of the same size k. Needs every layer sparsified in `spec`."""
  if any(k is None for k in spec.layer_k):
    raise ValueError("the stability analysis needs every layer's core set: use all layers")
  if spec.scoring not in TOKEN_WISE_SCORINGS:
    raise ValueError(f"the stability analysis needs token-wise core neurons: scoring "
                     f"{', '.join(TOKEN_WISE_SCORINGS)}, not {spec.scoring}")
  F = config.intermediate_size
  bucket = max(len(p) for p in prompt_ids)
  tokens_BT, start_B = left_pad(prompt_ids, bucket)
  # The greedy selecting prefill of generation, with every layer's core set.
  prefill = jax.jit(prefill_fn(config, bucket + num_steps + 1, SamplingConfig(), Stability(spec)))
  tokens, cache, core, _ = prefill(params, jnp.asarray(tokens_BT), jnp.asarray(start_B),
                                   jax.random.key(seed), ())
  B = len(prompt_ids)
  sentence = tuple(jnp.asarray(multi_hot(np.asarray(c), F)) for c in core)
  rng = np.random.default_rng(seed)
  random = tuple(jnp.asarray(multi_hot(np.stack([rng.choice(F, k, replace=False) for _ in range(B)]),
                                       F)) for k in spec.layer_k)
  step = jax.jit(decode_overlap_fn(config, spec), donate_argnums=(1,))
  overlaps, randoms = [], []
  for _ in range(num_steps):
    tokens, cache, overlap_LB, random_LB = step(params, cache, tokens, sentence, random)
    overlaps.append(np.asarray(overlap_LB))
    randoms.append(np.asarray(random_LB))
  overlap_SLB, random_SLB = np.stack(overlaps), np.stack(randoms)
  return {
      "num_prompts": B, "num_steps": num_steps, "layer_k": list(spec.layer_k),
      "overlap_by_step_layer": overlap_SLB.mean(-1).tolist(),       # [step][layer], mean over prompts
      "random_by_step_layer": random_SLB.mean(-1).tolist(),
      "overlap_by_layer": overlap_SLB.mean((0, 2)).tolist(),
      "random_by_layer": random_SLB.mean((0, 2)).tolist(),
      "random_expected_by_layer": [k / F for k in spec.layer_k],
      "overlap_mean": float(overlap_SLB.mean()), "random_mean": float(random_SLB.mean()),
  }
