"""Similarity-guided decoding at run time: pick a prompt's cluster, decode on
that cluster's core neurons.

The prefill selects core neurons at the clustering layer only (`prefill_spec`);
`nearest_cluster` maps that set, as a multi-hot vector, to the nearest k-means
centroid; decoding runs on the cluster's stored per-layer sets, whose compact
FFNs `ClusterFFNs` gathers once per cluster and keeps: a prompt whose cluster
was seen before costs no gather at all.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from coreinfer_jax import gather
from coreinfer_jax.artefacts import ClusterArtefacts
from coreinfer_jax.core import CoreSpec
from coreinfer_jax.params import FFNParams, ModelParams


def prefill_spec(art: ClusterArtefacts) -> CoreSpec:
  """Selection at the clustering layer alone, with the clustering set size."""
  num_layers = len(art.layer_sets)
  F = art.centroids_CF.shape[1]
  layer_k = tuple(art.cluster_k if i == art.cluster_layer else None for i in range(num_layers))
  layer_beta = tuple(None if k is None else k / F for k in layer_k)
  return CoreSpec(art.spec.scoring, art.spec.alpha, layer_k, layer_beta)


def nearest_cluster(centroids_CF: jax.Array, core_BK: jax.Array) -> jax.Array:
  """int32 [B]: the centroid nearest (Euclidean, as k-means assigns) to each
  core set's multi-hot vector; ties go to the lower cluster index."""
  B = core_BK.shape[0]
  hot_BF = jnp.zeros((B, centroids_CF.shape[1]), jnp.float32)
  hot_BF = hot_BF.at[jnp.arange(B)[:, None], core_BK].set(1.0)
  centroids = centroids_CF.astype(jnp.float32)
  distances_BC = (jnp.sum(hot_BF, -1, keepdims=True) - 2.0 * hot_BF @ centroids.T
                  + jnp.sum(centroids * centroids, -1)[None, :])
  return jnp.argmin(distances_BC, axis=-1).astype(jnp.int32)


CompactFFNs = Tuple[Optional[FFNParams], ...]   # per layer [1, k, D] rows, None: dense


class ClusterFFNs:
  """Each cluster's compact FFNs, gathered on first use (or by `preload`) and
  kept: memory grows by β of the sparsified FFN weights per cluster used."""

  def __init__(self, art: ClusterArtefacts, compiled):
    self.art = art
    self._compiled = compiled      # a generation.CompiledFunctions
    self._centroids_CF = jnp.asarray(art.centroids_CF)   # on the device once
    self._ffns: Dict[int, CompactFFNs] = {}

  def assign(self, core: gather.CoreIndices) -> np.ndarray:
    """int32 [B]: each sequence's nearest cluster, from the prefill's core
    neurons at the clustering layer (read back to the host to pick weights)."""
    return np.asarray(self._compiled("assign", nearest_cluster, self._centroids_CF,
                                     core[self.art.cluster_layer]))

  def ffns(self, params: ModelParams, cluster: int) -> CompactFFNs:
    if cluster not in self._ffns:
      core = tuple(None if s is None else jnp.asarray(s[cluster:cluster + 1])
                   for s in self.art.layer_sets)
      self._ffns[cluster] = self._compiled("gather_cluster", gather.gather_core, params, core)
    return self._ffns[cluster]

  def preload(self, params: ModelParams) -> None:
    for cluster in range(self.art.num_clusters):
      jax.block_until_ready(self.ffns(params, cluster))

  @property
  def gathered(self) -> Tuple[int, ...]:
    return tuple(sorted(self._ffns))

  def decode_params(self, params: ModelParams, clusters_B: Sequence[int]) -> ModelParams:
    """`params` with each sequence's cluster FFNs swapped in: batch 1 uses the
    kept arrays as they are; a larger batch stacks them into `[B, k, D]` (a copy)."""
    per_sequence = [self.ffns(params, c) for c in clusters_B]
    if len(per_sequence) == 1:
      compact = per_sequence[0]
    else:
      compact = jax.tree_util.tree_map(lambda *rows: jnp.concatenate(rows), *per_sequence)
    return gather.with_compact_ffn(params, compact)
