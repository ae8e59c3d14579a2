"""FFN kinds and their arithmetic: what a decoder block's FFN can be.

Three explicit kinds, each a pytree that knows how to contract its own rows
(no dispatch on an array's rank):
- `FFNParams`: the weights shared by every sequence of a batch: the dense FFN
  (N = F) or a compact FFN shared by the batch (N = k, one core set's
  neurons). Neuron i is row i of up/gate (`[N, D]`) and column i of down
  (`[D, N]`, the checkpoints' own layout), so choosing neurons is a row
  gather of up/gate and a column gather of down.
- `PerSequenceFFN`: each sequence's own compact weights, `[B, k, D]` (up,
  gate) and `[B, D, k]` (down) (CoreInfer's per-prompt core sets, batched).

Every weight is `[out, in]`: a batch-1 decode step is a matrix-vector product
contracting each matrix's last (contiguous) axis, the access pattern XLA:CPU
streams fastest. Down stored `[N, D]` (contracting its leading axis) streamed
20-30% slower on the machines of issue #16, for the same bytes.
- `MaskedFFN`: dense rows with a per-sequence keep mask `[B, F]` (h[i] = 0 for
  dropped neurons): the dense-shaped equivalent of a compact FFN, used to
  score many core sets as rows of one batch.

The activation (`ModelConfig.ffn_activation`) is the config's: SwiGLU
`h = silu(x gateᵀ) * (x upᵀ)`, GeGLU `h = gelu_tanh(x gateᵀ) * (x upᵀ)`, or
ReLU `h = relu(x upᵀ + up_bias)`. What
core-neuron selection ranks is decided here once (`NeuronValues`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
from flax import struct

from coreinfer_jax.model.config import ModelConfig


def column_norms(down: jax.Array, axis: int) -> jax.Array:
  """float32 L2 norms of `down` along its model-width `axis`."""
  down = down.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(down * down, axis=axis))


@struct.dataclass
class FFNParams:
  """Weights shared by the batch; every `F` axis has N neurons (F dense, k compact)."""
  up_FD: jax.Array                          # Llama up_proj / OPT fc1
  down_DF: jax.Array                        # Llama down_proj / OPT fc2
  gate_FD: Optional[jax.Array] = None       # Llama gate_proj (SwiGLU only)
  up_bias_F: Optional[jax.Array] = None     # OPT fc1 bias
  down_bias_D: Optional[jax.Array] = None   # OPT fc2 bias

  AXES = {"up_FD": ("neurons", "embed"), "down_DF": ("embed", "neurons"),
          "gate_FD": ("neurons", "embed"), "up_bias_F": ("neurons",),
          "down_bias_D": ("embed",)}

  @jax.named_scope("ffn_in")
  def project_in(self, x_BTD: jax.Array) -> Tuple[jax.Array, Optional[jax.Array]]:
    """(x upᵀ + up_bias, x gateᵀ or None), each `[B, T, N]`."""
    up = jnp.einsum("btd,fd->btf", x_BTD, self.up_FD)
    if self.up_bias_F is not None:
      up = up + self.up_bias_F
    gate = None if self.gate_FD is None else jnp.einsum("btd,fd->btf", x_BTD, self.gate_FD)
    return up, gate

  def for_input(self, x_BTD: jax.Array) -> "FFNParams":
    """The FFN a chunk computes with (the same rows for every token)."""
    return self

  def keep(self, h_BTN: jax.Array) -> jax.Array:
    return h_BTN

  def out_norms(self) -> jax.Array:
    """float32 [N]: each neuron's down-projection column norm ||down[:, i]||₂,
    shaped to scale a `[B, T, N]` activation."""
    return column_norms(self.down_DF, axis=0)

  @jax.named_scope("ffn_out")
  def project_out(self, h_BTN: jax.Array) -> jax.Array:
    out = jnp.einsum("btf,df->btd", h_BTN, self.down_DF)
    return out if self.down_bias_D is None else out + self.down_bias_D


@struct.dataclass
class PerSequenceFFN:
  """Each sequence's own k neurons of every weight."""
  up_BKD: jax.Array
  down_BDK: jax.Array
  gate_BKD: Optional[jax.Array] = None
  up_bias_BK: Optional[jax.Array] = None
  down_bias_D: Optional[jax.Array] = None

  AXES = {"up_BKD": ("batch", "neurons", "embed"), "down_BDK": ("batch", "embed", "neurons"),
          "gate_BKD": ("batch", "neurons", "embed"), "up_bias_BK": ("batch", "neurons"),
          "down_bias_D": ("embed",)}

  @property
  def batch(self) -> int:
    return self.up_BKD.shape[0]

  @jax.named_scope("ffn_in")
  def project_in(self, x_BTD: jax.Array) -> Tuple[jax.Array, Optional[jax.Array]]:
    up = jnp.einsum("btd,bkd->btk", x_BTD, self.up_BKD)
    if self.up_bias_BK is not None:
      up = up + self.up_bias_BK[:, None, :]
    gate = None if self.gate_BKD is None else jnp.einsum("btd,bkd->btk", x_BTD, self.gate_BKD)
    return up, gate

  def for_input(self, x_BTD: jax.Array) -> "PerSequenceFFN":
    return self

  def keep(self, h_BTK: jax.Array) -> jax.Array:
    return h_BTK

  def out_norms(self) -> jax.Array:
    """float32 [B, 1, k]: each sequence's neurons' down-projection column norms."""
    return column_norms(self.down_BDK, axis=1)[:, None, :]

  @jax.named_scope("ffn_out")
  def project_out(self, h_BTK: jax.Array) -> jax.Array:
    out = jnp.einsum("btk,bdk->btd", h_BTK, self.down_BDK)
    return out if self.down_bias_D is None else out + self.down_bias_D


@struct.dataclass
class MaskedFFN:
  """The dense rows, each sequence keeping only the neurons of `keep_BF` (1/0)."""
  dense: FFNParams
  keep_BF: jax.Array

  AXES = {"keep_BF": ("batch", "neurons")}

  def for_input(self, x_BTD: jax.Array) -> "MaskedFFN":
    return self

  def project_in(self, x_BTD: jax.Array) -> Tuple[jax.Array, Optional[jax.Array]]:
    return self.dense.project_in(x_BTD)

  def keep(self, h_BTF: jax.Array) -> jax.Array:
    return h_BTF * self.keep_BF[:, None, :].astype(h_BTF.dtype)

  def out_norms(self) -> jax.Array:
    return self.dense.out_norms()

  def project_out(self, h_BTF: jax.Array) -> jax.Array:
    return self.dense.project_out(h_BTF)


FFN = Union[FFNParams, PerSequenceFFN, MaskedFFN]   # and `model.token_ffn`'s kinds


class NeuronValues(NamedTuple):
  """One FFN's per-neuron values over a chunk, `[B, T, N]`.

  `values` is what the paper's signed rule ranks (h for gated FFNs; for ReLU
  FFNs the fc1 output before the ReLU, as the official code); `h` is the
  activation itself (what magnitude and GRIFFIN rank). For gated FFNs they
  are the same array. `out_norms` is each neuron's down-projection column
  norm, broadcastable to `[B, T, N]` (what the weight-aware scorings scale
  |h| by: a neuron's contribution to the block's output is h·down[:, i]).
  Only a scoring that reads it costs anything: XLA drops it otherwise.
  `inputs` is the FFN's input `[B, T, D]` (what a learned neuron predictor
  reads; its training data is tapped here)."""
  values: jax.Array
  h: jax.Array
  out_norms: jax.Array
  inputs: jax.Array


# The gate's activation of each gated `ModelConfig.ffn_activation`.
_GATE_ACTIVATIONS = {"silu_gated": jax.nn.silu,
                     "gelu_tanh_gated": functools.partial(jax.nn.gelu, approximate=True)}


def neuron_values(config: ModelConfig, ffn: FFN, x_BTD: jax.Array) -> NeuronValues:
  up, gate = ffn.project_in(x_BTD)
  with jax.named_scope("ffn_activation"):
    if config.ffn_activation == "relu":
      return NeuronValues(up, jax.nn.relu(up), ffn.out_norms(), x_BTD)
    h = _GATE_ACTIVATIONS[config.ffn_activation](gate) * up
    return NeuronValues(h, h, ffn.out_norms(), x_BTD)


def ffn_output(ffn: FFN, h_BTN: jax.Array) -> jax.Array:
  """The block's output `[B, T, D]` from its activation (masked neurons dropped)."""
  return ffn.project_out(ffn.keep(h_BTN))
