"""What the selecting prefill computes per layer: taps over the FFN's neuron values.

A tap (`model.forward.Tap`) sees each layer's `NeuronValues` inside the one
dense pass. Two kinds serve every caller:
- `ranking_tap(requests)`: per layer, for each (scoring, α) asked there, the
  neurons ranked by the selection rule, `int32 [B, k_max]` (k_max: the
  largest k asked for that (scoring, α)). A smaller k's core set is a prefix
  of that order, so one ranking serves every policy of a run. A request with
  `keys` gets the ranking keys instead, for a policy that changes them
  before ranking (`order` ranks them as the tap would).
- `statistics_tap(scoring, alpha, layers)`: the ranking keys themselves
  (`selection.core_statistics`), which sum over sentences (clusters).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from coreinfer_jax.core import selection
from coreinfer_jax.model.ffn import NeuronValues


@dataclasses.dataclass(frozen=True)
class RankRequest:
  """One layer's core set asked of the prefill: the k first by `scoring`,
  k/blocks from each neuron block, one set per sequence or (`shared`) one
  for the batch, the token-wise top-m found by `top_m` (`core.spec.CoreSpec`).
  `keys`: the tap returns the per-sequence ranking keys (primary [B, F],
  secondary [B, F]) instead of an order."""
  scoring: str
  alpha: float
  k: int
  blocks: int = 1
  shared: bool = False
  top_m: str = "bisection"
  keys: bool = False

  @property
  def rule(self) -> "Rule":
    return self.scoring, self.alpha, self.blocks, self.shared, self.top_m, self.keys


Rule = Tuple[str, float, int, bool, str, bool]
# Per model layer, the requests at that layer (empty: nothing ranked there).
LayerRequests = Tuple[Tuple[RankRequest, ...], ...]
# Per model layer, {rule: int32 [B, blocks, k_max / blocks]} (B = 1 when
# shared), or for a `keys` rule (primary [B, F], secondary [B, F]).
Rankings = Tuple[Dict[Rule, Any], ...]


def merge_requests(num_layers: int, *per_policy: Sequence[Optional[RankRequest]]) -> LayerRequests:
  """Every policy's per-layer request (None: none) gathered per layer."""
  return tuple(tuple(r[layer] for r in per_policy if r[layer] is not None)
               for layer in range(num_layers))


def ranking_tap(requests: LayerRequests):
  """A tap returning, per layer, each asked rule's ranking `[B, k_max]`."""
  wanted = []
  for layer_requests in requests:
    k_max: Dict[Rule, int] = {}
    for r in layer_requests:
      k_max[r.rule] = max(k_max.get(r.rule, 0), r.k)
    wanted.append(k_max)

  def rank(values: NeuronValues, real_BT: jax.Array, rule: Rule, k: int):
    scoring, alpha, blocks, shared, top_m, keys_only = rule
    keys = selection.core_statistics(values, real_BT, scoring=scoring, alpha=alpha, top_m=top_m)
    return keys if keys_only else order(keys, k, blocks, shared)

  def tap(layer: int, values: NeuronValues, real_BT: jax.Array):
    return {rule: rank(values, real_BT, rule, k) for rule, k in wanted[layer].items()}
  return tap


def order(keys_BF: Tuple[jax.Array, jax.Array], k: int, blocks: int, shared: bool) -> jax.Array:
  """int32 [B, blocks, k / blocks] (B = 1 when `shared`): the neurons ranked
  by the keys, k/blocks from each block."""
  if shared:   # the keys are sums over tokens: summed over the batch, they rank all its tokens
    keys_BF = tuple(jnp.sum(key, axis=0, keepdims=True) for key in keys_BF)
  return selection.rank_in_blocks(k // blocks, blocks, *keys_BF)


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
