"""What the selecting prefill computes per layer: taps over the FFN's neuron values.

A tap (`model.forward.Tap`) sees each layer's `NeuronValues` inside the one
dense pass. Two kinds serve every caller:
- `ranking_tap(requests)`: per layer, for each (scoring, α) asked there, the
  neurons ranked by the selection rule, `int32 [B, k_max]` (k_max: the
  largest k asked for that (scoring, α)). A smaller k's core set is a prefix
  of that order, so one ranking serves every policy of a run.
- `statistics_tap(scoring, alpha, layers)`: the ranking keys themselves
  (`selection.core_statistics`), which sum over sentences (clusters).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from coreinfer_jax.core import selection
from coreinfer_jax.model.ffn import NeuronValues


@dataclasses.dataclass(frozen=True)
class RankRequest:
  """One layer's core set asked of the prefill: the k first by `scoring`,
  k/blocks from each neuron block, one set per sequence or (`shared`) one
  for the batch, the token-wise top-m found by `top_m` (`core.spec.CoreSpec`)."""
  scoring: str
  alpha: float
  k: int
  blocks: int = 1
  shared: bool = False
  top_m: str = "bisection"

  @property
  def rule(self) -> Tuple[str, float, int, bool, str]:
    return self.scoring, self.alpha, self.blocks, self.shared, self.top_m


# Per model layer, the requests at that layer (empty: nothing ranked there).
LayerRequests = Tuple[Tuple[RankRequest, ...], ...]
# Per model layer, {rule: int32 [B, blocks, k_max / blocks]} (B = 1 when shared).
Rankings = Tuple[Dict[Tuple[str, float, int, bool, str], jax.Array], ...]


def merge_requests(num_layers: int, *per_policy: Sequence[Optional[RankRequest]]) -> LayerRequests:
  """Every policy's per-layer request (None: none) gathered per layer."""
  return tuple(tuple(r[layer] for r in per_policy if r[layer] is not None)
               for layer in range(num_layers))


def ranking_tap(requests: LayerRequests):
  """A tap returning, per layer, each asked rule's ranking `[B, k_max]`."""
  wanted = []
  for layer_requests in requests:
    k_max: Dict[Tuple[str, float, int, bool, str], int] = {}
    for r in layer_requests:
      k_max[r.rule] = max(k_max.get(r.rule, 0), r.k)
    wanted.append(k_max)

  def rank(values: NeuronValues, real_BT: jax.Array, rule, k: int) -> jax.Array:
    scoring, alpha, blocks, shared, top_m = rule
    keys = selection.core_statistics(values, real_BT, scoring=scoring, alpha=alpha, top_m=top_m)
    if shared:   # the keys are sums over tokens: summed over the batch, they rank all its tokens
      keys = tuple(jnp.sum(key, axis=0, keepdims=True) for key in keys)
    return selection.rank_in_blocks(k // blocks, blocks, *keys)

  def tap(layer: int, values: NeuronValues, real_BT: jax.Array):
    return {rule: rank(values, real_BT, rule, k) for rule, k in wanted[layer].items()}
  return tap


def take_core(rankings: Rankings, layer: int, request: Optional[RankRequest]) -> Optional[jax.Array]:
  """int32 [B, k] (B = 1 when shared): the request's core set from a ranking
  tap's output, block after block."""
  if request is None:
    return None
  ranked = rankings[layer][request.rule][:, :, :request.k // request.blocks]
  return ranked.reshape(ranked.shape[0], request.k)


def statistics_tap(scoring: str, alpha: float, layers: Sequence[int]):
  """A tap returning (primary [B, F], secondary [B, F]) at `layers`, None elsewhere."""
  wanted = frozenset(layers)

  def tap(layer: int, values: NeuronValues, real_BT: jax.Array):
    if layer not in wanted:
      return None
    return selection.core_statistics(values, real_BT, scoring=scoring, alpha=alpha)
  return tap
