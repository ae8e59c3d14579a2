"""How well offline clusters predict a held-out prompt's own core sets."""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import jax.numpy as jnp
import numpy as np

from coreinfer_jax.core.clusters import nearest_cluster
from coreinfer_jax.offline.clustering import TextStatistics, multi_hot


@dataclasses.dataclass
class HeldOutOverlap:
  own_cluster_by_layer: List[float]       # mean |prompt set ∩ its cluster's set| / k
  other_cluster_by_layer: List[float]     # the same with a random other cluster
  random_set_by_layer: List[float]        # k / F: a random set of the same size
  layers: List[int]
  clusters_chosen: List[int]


def held_out_overlap(stats: TextStatistics, centroids_CF: np.ndarray,
                     cluster_sets: Dict[int, np.ndarray], num_neurons: int, seed: int = 0
                     ) -> HeldOutOverlap:
  """For each held-out prompt: its nearest cluster (from its clustering-layer
  set), and per sparsified layer the overlap of its own stability set with
  that cluster's stored set, and with a random other cluster's set."""
  chosen = np.asarray(nearest_cluster(jnp.asarray(centroids_CF), jnp.asarray(stats.cluster_sets_NK)))
  C = centroids_CF.shape[0]
  rng = np.random.default_rng(seed)
  other = (chosen + rng.integers(1, C, size=len(chosen))) % C if C > 1 else chosen
  own, others, randoms = [], [], []
  for layer, sets_CK in sorted(cluster_sets.items()):
    k = sets_CK.shape[1]
    prompt_hot = multi_hot(stats.layer_sets(layer, k), num_neurons)
    cluster_hot = multi_hot(sets_CK, num_neurons)
    own.append(float(np.mean((prompt_hot * cluster_hot[chosen]).sum(1) / k)))
    others.append(float(np.mean((prompt_hot * cluster_hot[other]).sum(1) / k)))
    randoms.append(k / num_neurons)
  return HeldOutOverlap(own, others, randoms, sorted(cluster_sets), chosen.tolist())
