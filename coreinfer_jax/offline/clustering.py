"""Offline similarity-guided core neurons: per-text statistics, k-means, cluster sets.

1. `collect_statistics` runs the dense prefill over a dataset in batches. For
   each text and each needed layer it keeps the selection's ranking keys
   (`selection.core_statistics`: token-wise core counts and summed scores);
   the text's core set at the clustering layer is the k first by those keys.
   Finished batches are saved as shards in a work folder, so an interrupted
   run resumes where it stopped.
2. `choose_num_clusters` runs k-means on the clustering-layer sets as
   multi-hot vectors over k = 1..10 and takes the elbow of the inertia curve
   (kneed's Kneedle), at least 4.
3. `cluster_core_sets`: a cluster's core set at a layer is the stability rule
   over all tokens of its texts: the texts' ranking keys summed, the k first.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from coreinfer_jax.core import selection
from coreinfer_jax.core.spec import CoreSpec
from coreinfer_jax.core.taps import statistics_tap
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.params import ModelParams
from coreinfer_jax.offline import batch_pass
from coreinfer_jax.runtime.compile import CompiledFunctions
from coreinfer_jax.runtime.prefill import prefill

# The official code clusters at layer 25 of a 32-layer model.
PAPER_CLUSTER_LAYER_FRACTION = 25 / 32
MIN_CLUSTERS = 4
MAX_CLUSTERS = 10


def default_cluster_layer(num_layers: int) -> int:
  return min(num_layers - 1, int(np.floor(PAPER_CLUSTER_LAYER_FRACTION * num_layers + 0.5)))


@dataclasses.dataclass(frozen=True)
class StatisticsPlan:
  """What `collect_statistics` computes: ranking keys at `layers`, and each
  text's core set of `cluster_k` neurons at `cluster_layer` (one of `layers`;
  None: no core sets, the keys only)."""
  scoring: str
  alpha: float
  layers: Tuple[int, ...]
  cluster_layer: Optional[int] = None
  cluster_k: int = 0

  @classmethod
  def for_spec(cls, spec: CoreSpec, cluster_layer: int, cluster_k: int) -> "StatisticsPlan":
    layers = tuple(sorted(set(spec.sparse_layers) | {cluster_layer}))
    return cls(spec.scoring, spec.alpha, layers, cluster_layer, cluster_k)


@dataclasses.dataclass
class TextStatistics:
  cluster_sets_NK: np.ndarray                # int32 [N, cluster_k]
  primary: Dict[int, np.ndarray]             # per layer [N, F] (int32 counts or float32)
  secondary: Dict[int, np.ndarray]           # per layer float32 [N, F]
  batches_computed: int = 0                  # in this call (the rest came from shards)
  batches_resumed: int = 0
  seconds: float = 0.0                       # prefill time of the batches computed

  def layer_sets(self, layer: int, k: int) -> np.ndarray:
    """int32 [N, k]: each text's own core set at `layer`."""
    return np.asarray(selection.rank_neurons(k, jnp.asarray(self.primary[layer]),
                                             jnp.asarray(self.secondary[layer])))


def statistics_fn(config: ModelConfig, plan: StatisticsPlan):
  """(params, tokens [B, T], start [B]) -> (cluster-layer sets int32 [B, k] (k = 0 without one),
  per layer of `plan.layers` (primary [B, F], secondary [B, F])). One dense pass."""
  tap = statistics_tap(plan.scoring, plan.alpha, plan.layers)

  def statistics(params: ModelParams, tokens_BT, start_B):
    _, _, stats = prefill(params, config, tokens_BT, start_B, tap, cache_len=tokens_BT.shape[1])
    if plan.cluster_layer is None:
      sets = jnp.zeros((tokens_BT.shape[0], 0), jnp.int32)
    else:
      sets = selection.rank_neurons(plan.cluster_k, *stats[plan.cluster_layer])
    return sets, tuple(stats[i] for i in plan.layers)
  return statistics


def _batch_arrays(sets, stats, plan: StatisticsPlan) -> Dict[str, jax.Array]:
  arrays = {"sets": sets}
  for layer, (primary, secondary) in zip(plan.layers, stats):
    arrays[f"primary_{layer}"] = primary
    arrays[f"secondary_{layer}"] = secondary
  return arrays


def collect_statistics(params: ModelParams, config: ModelConfig, token_ids: Sequence[Sequence[int]],
                       plan: StatisticsPlan, *, batch_size: int = 8,
                       work_dir: Optional[str] = None, progress: bool = False,
                       compute_batch: Optional[Callable] = None) -> TextStatistics:
  """Per-text statistics over `token_ids`, batch by batch. With `work_dir`,
  each finished batch is saved there and batches already saved are loaded
  instead of recomputed. `compute_batch(tokens, start)` replaces the compiled
  statistics pass (tests count or interrupt it)."""
  compiled = CompiledFunctions()
  fn = statistics_fn(config, plan)
  if compute_batch is None:
    compute_batch = lambda tokens, start: compiled("statistics", fn, params, tokens, start)  # noqa: E731
  batches = batch_pass.BatchPass()
  shards = batches.run(token_ids, batch_size,
                       lambda tokens, start: _batch_arrays(*compute_batch(tokens, start), plan),
                       work_dir=work_dir, progress=progress)
  joined = {name: np.concatenate([s[name] for s in shards]) for name in shards[0]}
  return TextStatistics(joined["sets"],
                        {i: joined[f"primary_{i}"] for i in plan.layers},
                        {i: joined[f"secondary_{i}"] for i in plan.layers},
                        batches_computed=batches.computed, batches_resumed=batches.resumed,
                        seconds=batches.seconds)


def multi_hot(sets_NK: np.ndarray, num_neurons: int) -> np.ndarray:
  """float32 [N, F]: 1 at each text's core neurons."""
  out = np.zeros((sets_NK.shape[0], num_neurons), np.float32)
  np.put_along_axis(out, sets_NK.astype(np.int64), 1.0, axis=1)
  return out


def kmeans(points_NF: np.ndarray, num_clusters: int, seed: int):
  from sklearn.cluster import KMeans
  return KMeans(n_clusters=num_clusters, n_init=10, random_state=seed).fit(points_NF)


def choose_num_clusters(points_NF: np.ndarray, seed: int) -> Tuple[int, list]:
  """(number of clusters, inertia for k = 1..10): the elbow of the inertia
  curve (Kneedle: convex, decreasing), at least 4, at most the number of texts."""
  from kneed import KneeLocator
  ks = list(range(1, min(MAX_CLUSTERS, len(points_NF)) + 1))
  inertias = [float(kmeans(points_NF, k, seed).inertia_) for k in ks]
  knee = None
  if len(ks) >= 3 and inertias[0] > inertias[-1]:
    knee = KneeLocator(ks, inertias, curve="convex", direction="decreasing").knee
  return min(len(points_NF), max(MIN_CLUSTERS, int(knee or MIN_CLUSTERS))), inertias


def cluster_core_sets(assignments_N: np.ndarray, num_clusters: int, stats: TextStatistics,
                      layer_k: Sequence[Optional[int]]) -> Tuple[Optional[np.ndarray], ...]:
  """Per model layer, int32 [C, k] (None for a dense layer): each cluster's
  core set, the stability rule over all tokens of its texts."""
  out = []
  for layer, k in enumerate(layer_k):
    if k is None:
      out.append(None)
      continue
    primary = stats.primary[layer]
    summed_primary = np.stack([primary[assignments_N == c].sum(0) for c in range(num_clusters)])
    summed_secondary = np.stack([stats.secondary[layer][assignments_N == c].sum(0, dtype=np.float64)
                                 for c in range(num_clusters)]).astype(np.float32)
    out.append(np.asarray(selection.rank_neurons(
        k, jnp.asarray(summed_primary.astype(primary.dtype)), jnp.asarray(summed_secondary))))
  return tuple(out)
