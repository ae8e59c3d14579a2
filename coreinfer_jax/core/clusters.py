"""Similarity-guided decoding at run time: a prompt's nearest cluster.

The prefill ranks core neurons at the clustering layer only; that set, as a
multi-hot vector, picks the nearest k-means centroid; decoding runs on the
cluster's stored per-layer sets (`policy.Similarity`), whose compact FFNs
`store.ClusterStore` gathers once per cluster and keeps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
