"""Compact FFN weights from core-neuron indices.

`gather_per_sequence` keeps, per sequence, neurons `core[b]` of every
weight (`PerSequenceFFN`: rows of up/gate, `[B, k, D]`, and columns of down,
`[B, D, k]`), so each sequence of a batch decodes with its own core set;
`gather_shared` keeps one set's neurons for the whole batch (`FFNParams` of
k neurons); `CoreGather` applies one of them to every sparsified layer. Neurons are kept in ascending order whatever the ranking: with
k = F the compact FFN is the dense FFN itself, bit for bit.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp

from coreinfer_jax.model.ffn import FFNParams, PerSequenceFFN
from coreinfer_jax.model.params import ModelParams

CoreSets = Tuple[Optional[jax.Array], ...]   # per layer int32 [B, k] ([1, k] shared), or None
CompactFFNs = Tuple[Optional[Union[PerSequenceFFN, FFNParams]], ...]


# `mode`, what an index past the last neuron gathers: "fill", a neuron of
# zeros (the mesh's empty slots use it); "clip", the last neuron, for indices
# known to be in range (host-side gathers: `compute_on` cannot build fill's
# constants).


def _rows(w: Optional[jax.Array], core: jax.Array, mode: str) -> Optional[jax.Array]:
  """Rows `core` (`[k]` or `[B, k]`) of a `[F, ...]` weight: `[(B,) k, ...]`."""
  return None if w is None else jnp.take(w, jnp.sort(core, axis=-1), axis=0, mode=mode,
                                         fill_value=0)


def _columns(w_DF: jax.Array, core: jax.Array, mode: str) -> jax.Array:
  """Columns `core` (`[k]` or `[B, k]`) of a `[D, F]` weight: `[(B,) D, k]`."""
  return jnp.moveaxis(jnp.take(w_DF, jnp.sort(core, axis=-1), axis=1, mode=mode, fill_value=0),
                      0, -2)


def gather_per_sequence(ffn: FFNParams, core_BK: jax.Array, mode: str = "fill") -> PerSequenceFFN:
  """Neurons `core_BK[b]` of every weight, for each sequence b (an index F
  or more, in mode "fill": a neuron of zeros, which adds nothing)."""
  return PerSequenceFFN(up_BKD=_rows(ffn.up_FD, core_BK, mode),
                        down_BDK=_columns(ffn.down_DF, core_BK, mode),
                        gate_BKD=_rows(ffn.gate_FD, core_BK, mode),
                        up_bias_BK=_rows(ffn.up_bias_F, core_BK, mode), down_bias_D=ffn.down_bias_D)


def gather_shared(ffn: FFNParams, core_K: jax.Array, mode: str = "fill") -> FFNParams:
  """Neurons `core_K` of every weight, one compact FFN for the batch."""
  return FFNParams(up_FD=_rows(ffn.up_FD, core_K, mode), down_DF=_columns(ffn.down_DF, core_K, mode),
                   gate_FD=_rows(ffn.gate_FD, core_K, mode),
                   up_bias_F=_rows(ffn.up_bias_F, core_K, mode), down_bias_D=ffn.down_bias_D)


class CoreGather:
  """Core sets into compact FFNs, on one device: per sequence (`[B, k]` sets
  into `PerSequenceFFN`s) or, with `shared`, one `[1, k]` set per layer into
  the batch's `FFNParams` of k neurons. Subclasses place the gather elsewhere
  (`runtime.core_placement`: a tensor-parallel mesh)."""

  def __init__(self, shared: bool = False, index_mode: str = "fill"):
    self.shared = shared
    self.index_mode = index_mode

  def layer(self, ffn: FFNParams, core: jax.Array):
    if self.shared:
      return gather_shared(ffn, core[0], self.index_mode)
    return gather_per_sequence(ffn, core, self.index_mode)

  def __call__(self, params: ModelParams, core: CoreSets) -> CompactFFNs:
    """Per layer, the compact FFN (None where the layer stays dense). Jit
    this: it copies the kept rows once per sentence."""
    return tuple(None if c is None else self.layer(layer.ffn, c)
                 for layer, c in zip(params.layers, core))

  def into(self, params: ModelParams, core: CoreSets, out: CompactFFNs) -> CompactFFNs:
    """The gather writing into `out` when it is donated (`donate_argnums=2`):
    reusing a finished sentence's buffers skips allocating and first-touching
    the ~β of the FFN weights that every gather writes."""
    del out   # only its buffers are used, through donation
    return self(params, core)

  def shardings(self, shapes: CompactFFNs):
    """The shardings of the gather's outputs of `shapes`: None on one device."""
    del shapes
    return None

  def buffers(self, shapes: CompactFFNs) -> CompactFFNs:
    """Zero arrays of `shapes` (ShapeDtypeStructs), placed as the gather's output."""
    return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

