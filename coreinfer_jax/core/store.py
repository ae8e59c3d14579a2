"""FFN stores: where the decode step's compact FFNs come from after a prefill.

A policy's core sets become decode parameters through a store:
- `DenseStore`: the parameters as they are (dense decoding);
- `GatherStore`: each prompt's rows gathered by one compiled gather
  (`[B, k, D]`), written into the previous sentence's buffers when they are
  handed back (`recycle`): reusing them skips allocating and first-touching
  the ~β of the FFN weights that every gather writes;
- `ClusterStore`: one compact FFN per cluster, gathered on first use (or by
  `preload`) and kept: a prompt whose cluster was used before costs no gather;
- `PredictorStore`: the predicted layers' `PredictedFFN`s, made once (each
  token's rows are gathered inside the decode step).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from coreinfer_jax.core import gather
from coreinfer_jax.model.params import ModelParams
from coreinfer_jax.model.token_ffn import NeuronPredictor, PredictedFFN


def _same_shapes(a, b) -> bool:
  shapes = lambda t: (jax.tree_util.tree_structure(t),   # noqa: E731
                      [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(t)])
  return shapes(a) == shapes(b)


class DenseStore:
  def decode_params(self, params: ModelParams, core: gather.CoreSets,
                    aux: Mapping[str, jax.Array]) -> ModelParams:
    return params

  def recycle(self, decode_params: ModelParams) -> None:
    pass

  def preload(self, params: ModelParams) -> None:
    pass


class GatherStore(DenseStore):
  """Per-prompt gathers, into recycled buffers when a finished sentence's
  compact FFNs were handed back."""

  def __init__(self, compiled, layer_k: Sequence[Optional[int]], core_gather: gather.CoreGather):
    self._compiled = compiled      # a runtime.compile.CompiledFunctions
    self._layer_k = tuple(layer_k)
    self._gather = core_gather
    self._recycled: Optional[gather.CompactFFNs] = None

  def decode_params(self, params: ModelParams, core: gather.CoreSets,
                    aux: Mapping[str, jax.Array]) -> ModelParams:
    shapes = jax.eval_shape(self._gather, params, core)
    recycled, self._recycled = self._recycled, None
    if recycled is None or not _same_shapes(recycled, shapes):
      recycled = self._gather.buffers(shapes)
    compact = self._compiled("gather", self._gather.into, params, core, recycled,
                             donate_argnums=(2,))
    return params.with_ffns(compact)

  def recycle(self, decode_params: ModelParams) -> None:
    """Keeps a finished sentence's compact FFNs for the next gather to write
    into; the decode parameters must not be used again."""
    self._recycled = tuple(layer.ffn if k is not None else None
                           for layer, k in zip(decode_params.layers, self._layer_k))


class ClusterStore(DenseStore):
  """Each cluster's compact FFNs (`[1, k, D]` per layer), gathered once and
  kept: memory grows by β of the sparsified FFN weights per cluster used."""

  def __init__(self, compiled, layer_sets: Tuple[Optional[np.ndarray], ...],
               core_gather: gather.CoreGather):
    self._compiled = compiled
    self._layer_sets = layer_sets    # per model layer int32 [C, k] or None
    self._gather = core_gather
    self._ffns: Dict[int, gather.CompactFFNs] = {}

  def ffns(self, params: ModelParams, cluster: int) -> gather.CompactFFNs:
    if cluster not in self._ffns:
      core = tuple(None if s is None else jnp.asarray(s[cluster:cluster + 1])
                   for s in self._layer_sets)
      self._ffns[cluster] = self._compiled("gather_cluster", self._gather, params, core)
    return self._ffns[cluster]

  def preload(self, params: ModelParams) -> None:
    num_clusters = next(s for s in self._layer_sets if s is not None).shape[0]
    for cluster in range(num_clusters):
      jax.block_until_ready(self.ffns(params, cluster))

  @property
  def gathered(self) -> Tuple[int, ...]:
    return tuple(sorted(self._ffns))

  def decode_params(self, params: ModelParams, core: gather.CoreSets,
                    aux: Mapping[str, jax.Array]) -> ModelParams:
    """`params` with each sequence's cluster FFNs swapped in: batch 1 uses the
    kept arrays as they are; a larger batch stacks them into `[B, k, D]` (a copy)."""
    per_sequence = [self.ffns(params, c) for c in np.asarray(aux["cluster_ids"]).tolist()]
    if len(per_sequence) == 1:
      compact = per_sequence[0]
    else:
      compact = jax.tree_util.tree_map(lambda *rows: jnp.concatenate(rows), *per_sequence)
    return params.with_ffns(compact)


def predicted_params(params: ModelParams, layer_k: Sequence[Optional[int]],
                     predictors: Sequence[Optional[NeuronPredictor]]) -> ModelParams:
  """`params` with every layer of a k decoding each token's predicted top k."""
  return params.with_ffns(tuple(
      None if k is None else PredictedFFN.from_dense(layer.ffn, predictor, k)
      for layer, k, predictor in zip(params.layers, layer_k, predictors)))


class PredictorStore(DenseStore):
  """The predicted FFNs (`predicted_params`), made on the first prompt and
  kept: a transposed copy of each predicted layer's down projection."""

  def __init__(self, layer_k: Sequence[Optional[int]],
               predictors: Sequence[Optional[NeuronPredictor]]):
    self._layer_k = tuple(layer_k)
    self._predictors = tuple(predictors)
    self._ffns: Optional[Tuple] = None

  def decode_params(self, params: ModelParams, core: gather.CoreSets,
                    aux: Mapping[str, jax.Array]) -> ModelParams:
    if self._ffns is None:
      predicted = predicted_params(params, self._layer_k, self._predictors)
      self._ffns = tuple(layer.ffn if k is not None else None
                         for layer, k in zip(predicted.layers, self._layer_k))
    return params.with_ffns(self._ffns)

  def preload(self, params: ModelParams) -> None:
    self.decode_params(params, (), {})
