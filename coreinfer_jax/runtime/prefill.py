"""The one selecting prefill: a dense pass over left-padded prompts with a tap.

Generation, continuation scoring, clustering, calibration and the analyses
all start here: a fresh cache of `cache_len` slots, the prompt written at
slot 0, and the tap's per-layer output (core-neuron rankings, clustering
statistics, ...) from the same pass.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import jax

from coreinfer_jax.model.cache import KVCache, init_cache
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.forward import Tap, UseLayer, forward_tapped
from coreinfer_jax.model.params import ModelParams


def prefill(params: ModelParams, config: ModelConfig, tokens_BT: jax.Array, start_B: jax.Array,
            tap: Optional[Tap], cache_len: int, use_layer: Optional[UseLayer] = None,
            ) -> Tuple[jax.Array, KVCache, Tuple[Any, ...]]:
  """(float32 logits of the last position [B, V], the cache, per layer the
  tap's output). `start_B`: each prompt's first real slot (its left padding);
  `use_layer` as `forward_tapped` says."""
  cache = init_cache(config, tokens_BT.shape[0], cache_len, start_B, params.embed_VE.dtype)
  logits_B1V, cache, tapped = forward_tapped(params, config, cache, tokens_BT, tap, last_only=True,
                                             use_layer=use_layer)
  return logits_B1V[:, 0], cache, tapped
