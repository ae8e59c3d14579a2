"""Compact FFN weights from core-neuron indices, and the bytes decoding reads.

A gathered FFN keeps, per sequence, rows `core[b]` of every neuron-major
matrix: `[B, k, D]` (and `[B, k]` for OPT's fc1 bias), so each sequence of a
batch decodes with its own core set. `layers` contracts these with a batched
einsum; for B = 1 that reads the same bytes as a shared `[k, D]` matrix, which
a core set of shape `[k]` gathers (evaluation shares it across a context's
choices). Rows are kept in ascending neuron order whatever the ranking: with
k = F the compact FFN is the dense FFN itself, bit for bit.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from coreinfer_jax.params import FFNParams, ModelParams, decode_weight_bytes, param_bytes

CoreIndices = Tuple[Optional[jax.Array], ...]   # per layer int32 [B, k], or None (dense)


def gather_ffn(ffn: FFNParams, core_BK: jax.Array) -> FFNParams:
  """Rows `core` (int32 [B, k] or [k]) of every neuron-major weight."""
  core_BK = jnp.sort(core_BK, axis=-1)

  def rows(w):
    return None if w is None else jnp.take(w, core_BK, axis=0)
  return FFNParams(up_FD=rows(ffn.up_FD), down_FD=rows(ffn.down_FD), gate_FD=rows(ffn.gate_FD),
                   up_bias_F=rows(ffn.up_bias_F), down_bias_D=ffn.down_bias_D)


def gather_core(params: ModelParams, core: CoreIndices) -> Tuple[Optional[FFNParams], ...]:
  """Per layer, the compact FFN (None where the layer stays dense). Jit this:
  it copies the kept rows once per sentence."""
  return tuple(None if c is None else gather_ffn(layer.ffn, c)
               for layer, c in zip(params.layers, core))


def gather_core_into(params: ModelParams, core: CoreIndices,
                     out: Tuple[Optional[FFNParams], ...]) -> Tuple[Optional[FFNParams], ...]:
  """`gather_core` writing into `out` when it is donated (`donate_argnums=2`):
  reusing a finished sentence's buffers skips allocating and first-touching
  the ~β of the FFN weights that every gather writes."""
  del out   # only its buffers are used, through donation
  return gather_core(params, core)


def with_compact_ffn(params: ModelParams, compact: Sequence[Optional[FFNParams]]) -> ModelParams:
  """The decode parameters: `params` with the gathered FFNs swapped in (no copy)."""
  layers = tuple(layer if ffn is None else layer.replace(ffn=ffn)
                 for layer, ffn in zip(params.layers, compact))
  return params.replace(layers=layers)


def _ffn_bytes_per_sequence(ffn: FFNParams) -> float:
  batch = ffn.up_FD.shape[0] if ffn.up_FD.ndim == 3 else 1
  return param_bytes(ffn.replace(down_bias_D=None)) / batch + param_bytes(ffn.down_bias_D)


def ffn_bytes_per_sequence(params: ModelParams) -> float:
  """FFN weight bytes one sequence's decode token reads."""
  return sum(_ffn_bytes_per_sequence(layer.ffn) for layer in params.layers)


def ffn_bytes_fraction(dense: ModelParams, sparse: ModelParams) -> float:
  """FFN weight bytes read per decode token, sparse over dense."""
  return ffn_bytes_per_sequence(sparse) / ffn_bytes_per_sequence(dense)


def decode_weight_bytes_per_sequence(dense: ModelParams, sparse: ModelParams) -> float:
  """All weight bytes one sequence's decode token reads with `sparse` FFNs."""
  return decode_weight_bytes(dense) - ffn_bytes_per_sequence(dense) + ffn_bytes_per_sequence(sparse)
