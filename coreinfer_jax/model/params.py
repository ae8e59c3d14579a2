"""Parameter pytrees, one array per layer, with a logical axis name per dimension.

Linear weights keep the `[out, in]` layout of torch checkpoints, so a matmul
is a contraction over the last axis of both operands; FFN neurons are rows of
up/gate and columns of down (`model/ffn.py`). Optional fields are None where an architecture
has no such tensor.

Every weight dimension has a logical name ("vocab", "embed", "heads",
"kv_heads", "neurons", ...): each dataclass lists its fields' names in
`AXES`, and `logical_axes(tree)` returns the matching tree of name tuples, so
that a placement (a device mesh, host memory) is a table from logical names
to mesh axes rather than code that knows each weight.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
from flax import struct

from coreinfer_jax.model.ffn import FFN, FFNParams, MaskedFFN, PerSequenceFFN
from coreinfer_jax.model.token_ffn import (NeuronPredictor, PerTokenFFN, PredictedFFN,
                                           PredictedMaskedFFN, TokenMaskedFFN)


@struct.dataclass
class NormParams:
  scale_D: jax.Array
  bias_D: Optional[jax.Array] = None   # LayerNorm only

  AXES = {"scale_D": ("embed",), "bias_D": ("embed",)}


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
  q_norm_K: Optional[jax.Array] = None   # [hd] RMSNorm scale of each head's q (qk_norm)
  k_norm_K: Optional[jax.Array] = None   # [hd] the same for k

  AXES = {"q_weight": ("heads", "embed"), "k_weight": ("kv_heads", "embed"),
          "v_weight": ("kv_heads", "embed"), "o_weight": ("embed", "heads"),
          "q_bias": ("heads",), "k_bias": ("kv_heads",), "v_bias": ("kv_heads",),
          "o_bias": ("embed",), "q_norm_K": ("head_dim",), "k_norm_K": ("head_dim",)}


@struct.dataclass
class LayerParams:
  attn_norm: NormParams
  attn: AttentionParams
  ffn_norm: NormParams
  ffn: FFN
  # "sandwich" norm placement: the norms of each block's output (Gemma 2/3).
  attn_out_norm: Optional[NormParams] = None
  ffn_out_norm: Optional[NormParams] = None

  AXES = {}


@struct.dataclass
class ModelParams:
  embed_VE: jax.Array                            # [V, E]; E = D unless OPT projects
  layers: Tuple[LayerParams, ...]
  final_norm: Optional[NormParams] = None
  lm_head_VE: Optional[jax.Array] = None         # None: tied to embed_VE
  positions_PD: Optional[jax.Array] = None       # learned positions [P + offset, D]
  project_in_DE: Optional[jax.Array] = None      # OPT [D, E]
  project_out_ED: Optional[jax.Array] = None     # OPT [E, D]

  AXES = {"embed_VE": ("vocab", "token_embed"), "lm_head_VE": ("vocab", "token_embed"),
          "positions_PD": ("positions", "embed"), "project_in_DE": ("embed", "token_embed"),
          "project_out_ED": ("token_embed", "embed")}

  @property
  def output_embedding(self) -> jax.Array:
    return self.embed_VE if self.lm_head_VE is None else self.lm_head_VE

  def with_ffns(self, ffns) -> "ModelParams":
    """These parameters with each layer's FFN replaced where `ffns` has one
    (None keeps the layer's own); nothing is copied."""
    layers = tuple(layer if ffn is None else layer.replace(ffn=ffn)
                   for layer, ffn in zip(self.layers, ffns))
    return self.replace(layers=layers)


PARAM_CLASSES = (NormParams, AttentionParams, LayerParams, ModelParams, FFNParams,
                 PerSequenceFFN, MaskedFFN, NeuronPredictor, PerTokenFFN, PredictedFFN,
                 TokenMaskedFFN, PredictedMaskedFFN)


def logical_axes(tree: Any) -> Any:
  """The same tree with every array replaced by its tuple of logical axis
  names (None leaves stay None)."""
  if isinstance(tree, PARAM_CLASSES):
    return tree.replace(**{
        name: (tree.AXES[name] if name in tree.AXES and getattr(tree, name) is not None
               else logical_axes(getattr(tree, name)))
        for name, field in tree.__dataclass_fields__.items()
        if field.metadata.get("pytree_node", True)})   # static fields (a k) are not arrays
  if isinstance(tree, tuple):
    return tuple(logical_axes(t) for t in tree)
  if tree is None:
    return None
  raise TypeError(f"no logical axes for {type(tree).__name__}")
