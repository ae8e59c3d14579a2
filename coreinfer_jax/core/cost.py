"""Byte accounting: what a decode token reads, and the FFN fractions reported.

Every byte and FFN-fraction figure of the library comes from here:
`decode_weight_bytes` (a dense decode token; `_per_device` on a mesh, from
the shards), `ffn_bytes_per_sequence` (per
FFN kind), `ffn_bytes_fraction` and `decode_weight_bytes_per_sequence` (a
sparse decode against dense), `spec_ffn_bytes_fraction` (from a core spec's
sizes alone, no gather) and `kept_rows_fraction` (calibration's budget).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from coreinfer_jax.core.gather import gather_shared
from coreinfer_jax.core.spec import CoreSpec, num_core_neurons
from coreinfer_jax.model.ffn import FFNParams, MaskedFFN, PerSequenceFFN
from coreinfer_jax.model.params import ModelParams
from coreinfer_jax.model.token_ffn import PredictedFFN


def param_bytes(tree) -> int:
  return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree)))


def decode_weight_bytes(params: ModelParams) -> int:
  """Weight bytes one decode token reads: every layer, the final norm and the
  output projection in full, plus one row of the input embedding (and of the
  learned positions) when the output projection is not that same matrix."""
  total = param_bytes((tuple(layer.replace(ffn=None) for layer in params.layers),
                       params.final_norm, params.output_embedding, params.project_in_DE,
                       params.project_out_ED))
  total += sum(ffn_bytes_per_step(layer.ffn) for layer in params.layers)
  row_bytes = params.embed_VE.shape[1] * params.embed_VE.dtype.itemsize
  if params.lm_head_VE is not None:
    total += row_bytes
  if params.positions_PD is not None:
    total += params.positions_PD.shape[1] * params.positions_PD.dtype.itemsize
  return int(total)


def _shard(a: jax.Array) -> jax.ShapeDtypeStruct:
  """The shape and dtype of one device's shard of `a`."""
  return jax.ShapeDtypeStruct(a.sharding.shard_shape(a.shape), a.dtype)


def decode_weight_bytes_per_device(params: ModelParams) -> int:
  """`decode_weight_bytes` of one device's shards: the weight bytes each
  device reads per decode step (the whole batch), from the arrays' shardings."""
  return decode_weight_bytes(jax.tree_util.tree_map(_shard, params))


def bytes_in_memory(kind: str, *trees) -> int:
  """Bytes one device holds in memory `kind` ("device", "pinned_host") for the
  distinct arrays of `trees` (an array shared by two trees counts once), from
  each array's sharding and memory kind."""
  arrays = {id(a): a for tree in trees for a in jax.tree_util.tree_leaves(tree)}
  return param_bytes([_shard(a) for a in arrays.values() if a.sharding.memory_kind == kind])


@functools.singledispatch
def ffn_bytes_per_sequence(ffn) -> float:
  """FFN weight bytes one sequence's decode token reads."""
  raise TypeError(f"no byte accounting for {type(ffn).__name__}")


@ffn_bytes_per_sequence.register
def _(ffn: FFNParams) -> float:
  return float(param_bytes(ffn))


@ffn_bytes_per_sequence.register
def _(ffn: PerSequenceFFN) -> float:
  return param_bytes(ffn.replace(down_bias_D=None)) / ffn.batch + param_bytes(ffn.down_bias_D)


@ffn_bytes_per_sequence.register
def _(ffn: MaskedFFN) -> float:
  raise TypeError("a MaskedFFN reads the dense rows: it scores core sets, it does not decode")


@ffn_bytes_per_sequence.register
def _(ffn: PredictedFFN) -> float:
  """A token's k rows of every weight, plus the whole predictor (read every token)."""
  rows = param_bytes((ffn.up_FD, ffn.down_FD, ffn.gate_FD, ffn.up_bias_F))
  return (rows * ffn.k / ffn.num_neurons + param_bytes(ffn.down_bias_D)
          + param_bytes(ffn.predictor))


@functools.singledispatch
def ffn_bytes_per_step(ffn) -> float:
  """FFN weight bytes a decode step reads for its whole batch: every weight,
  except a token-wise kind's rows not chosen."""
  return param_bytes(ffn)


@ffn_bytes_per_step.register
def _(ffn: PredictedFFN) -> float:
  """One sequence's (B sequences read up to B times the rows)."""
  return ffn_bytes_per_sequence(ffn)


def model_ffn_bytes_per_sequence(params: ModelParams) -> float:
  return sum(ffn_bytes_per_sequence(layer.ffn) for layer in params.layers)


def ffn_bytes_fraction(dense: ModelParams, sparse: ModelParams) -> float:
  """FFN weight bytes read per decode token, sparse over dense."""
  return model_ffn_bytes_per_sequence(sparse) / model_ffn_bytes_per_sequence(dense)


def decode_weight_bytes_per_sequence(dense: ModelParams, sparse: ModelParams) -> float:
  """All weight bytes one sequence's decode token reads with `sparse` FFNs."""
  return (decode_weight_bytes(dense) - model_ffn_bytes_per_sequence(dense)
          + model_ffn_bytes_per_sequence(sparse))


def spec_ffn_bytes_fraction(params: ModelParams, spec: Optional[CoreSpec]) -> float:
  """FFN weight bytes per decode token under `spec`, over dense (from shapes alone)."""
  if spec is None:
    return 1.0
  compact = tuple(None if k is None else jax.eval_shape(
      gather_shared, layer.ffn, jax.ShapeDtypeStruct((k,), jnp.int32))
      for layer, k in zip(params.layers, spec.layer_k))
  return ffn_bytes_fraction(params, params.with_ffns(compact))


def kept_rows_fraction(layer_beta: Sequence[Optional[float]], num_neurons: int) -> float:
  """Kept FFN rows over all rows (every layer has `num_neurons`)."""
  kept = [num_neurons if b is None else num_core_neurons(b, num_neurons) for b in layer_beta]
  return sum(kept) / (num_neurons * len(kept))
