"""Parameter pytrees: one array per layer, FFN weights neuron-major.

Linear weights keep the `[out, in]` layout of torch checkpoints, so a matmul
is a contraction over the last axis of both operands. FFN weights are stored
as `[F, D]` (row i = neuron i) for all three matrices, so choosing neurons is a
row gather (GUIDE §2: this layout also streams fastest on XLA:CPU).
Optional fields are None where an architecture has no such tensor.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import numpy as np
from flax import struct


@struct.dataclass
class NormParams:
  scale_D: jax.Array
  bias_D: Optional[jax.Array] = None   # None: RMSNorm; set: LayerNorm


@struct.dataclass
class AttentionParams:
  q_weight: jax.Array   # [H*hd, D]
  k_weight: jax.Array   # [KVH*hd, D]
  v_weight: jax.Array   # [KVH*hd, D]
  o_weight: jax.Array   # [D, H*hd]
  q_bias: Optional[jax.Array] = None
  k_bias: Optional[jax.Array] = None
  v_bias: Optional[jax.Array] = None
  o_bias: Optional[jax.Array] = None


@struct.dataclass
class FFNParams:
  """SwiGLU (gate set): `h = silu(x gateᵀ) * (x upᵀ)`; ReLU (gate None):
  `h = relu(x upᵀ + up_bias)`. Output `h down + down_bias`.

  With k of F neurons kept, every `F` axis below has size k instead.
  """
  up_FD: jax.Array                          # Llama up_proj / OPT fc1
  down_FD: jax.Array                        # Llama down_projᵀ / OPT fc2ᵀ
  gate_FD: Optional[jax.Array] = None       # Llama gate_proj
  up_bias_F: Optional[jax.Array] = None     # OPT fc1 bias
  down_bias_D: Optional[jax.Array] = None   # OPT fc2 bias


@struct.dataclass
class LayerParams:
  attn_norm: NormParams
  attn: AttentionParams
  ffn_norm: NormParams
  ffn: FFNParams


@struct.dataclass
class ModelParams:
  embed_VE: jax.Array                            # [V, E]; E = D unless OPT projects
  layers: Tuple[LayerParams, ...]
  final_norm: Optional[NormParams] = None
  lm_head_VE: Optional[jax.Array] = None         # None: tied to embed_VE
  positions_PD: Optional[jax.Array] = None       # OPT learned positions [P + 2, D]
  project_in_DE: Optional[jax.Array] = None      # OPT [D, E]
  project_out_ED: Optional[jax.Array] = None     # OPT [E, D]

  @property
  def output_embedding(self) -> jax.Array:
    return self.embed_VE if self.lm_head_VE is None else self.lm_head_VE


def param_bytes(tree) -> int:
  return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree)))


def decode_weight_bytes(params: ModelParams) -> int:
  """Weight bytes one decode token reads: every layer, the final norm and the
  output projection in full, plus one row of the input embedding (and of the
  learned positions) when the output projection is not that same matrix."""
  total = param_bytes((params.layers, params.final_norm, params.output_embedding,
                       params.project_in_DE, params.project_out_ED))
  row_bytes = params.embed_VE.shape[1] * params.embed_VE.dtype.itemsize
  if params.lm_head_VE is not None:
    total += row_bytes
  if params.positions_PD is not None:
    total += params.positions_PD.shape[1] * params.positions_PD.dtype.itemsize
  return total
