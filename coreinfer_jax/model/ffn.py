"""FFN kinds and their arithmetic: what a decoder block's FFN can be.

Three explicit kinds, each a pytree that knows how to contract its own rows
(no dispatch on an array's rank):
- `FFNParams`: neuron-major rows `[N, D]` shared by every sequence of a batch:
  the dense FFN (N = F) or a compact FFN shared by the batch (N = k, the rows
  of one core set). Row i of up/gate/down is neuron i (down is stored
  transposed), so choosing neurons is a row gather.
- `PerSequenceFFN`: each sequence's own compact rows `[B, k, D]` (CoreInfer's
  per-prompt core sets, batched).
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


@struct.dataclass
class FFNParams:
  """Rows shared by the batch; every `F` axis has N rows (F dense, k compact)."""
  up_FD: jax.Array                          # Llama up_proj / OPT fc1
  down_FD: jax.Array                        # Llama down_projᵀ / OPT fc2ᵀ
  gate_FD: Optional[jax.Array] = None       # Llama gate_proj (SwiGLU only)
  up_bias_F: Optional[jax.Array] = None     # OPT fc1 bias
  down_bias_D: Optional[jax.Array] = None   # OPT fc2 bias

  AXES = {"up_FD": ("neurons", "embed"), "down_FD": ("neurons", "embed"),
          "gate_FD": ("neurons", "embed"), "up_bias_F": ("neurons",),
          "down_bias_D": ("embed",)}

  def project_in(self, x_BTD: jax.Array) -> Tuple[jax.Array, Optional[jax.Array]]:
    """(x upᵀ + up_bias, x gateᵀ or None), each `[B, T, N]`."""
    up = jnp.einsum("btd,fd->btf", x_BTD, self.up_FD)
    if self.up_bias_F is not None:
      up = up + self.up_bias_F
    gate = None if self.gate_FD is None else jnp.einsum("btd,fd->btf", x_BTD, self.gate_FD)
    return up, gate

  def keep(self, h_BTN: jax.Array) -> jax.Array:
    return h_BTN

  def project_out(self, h_BTN: jax.Array) -> jax.Array:
    out = jnp.einsum("btf,fd->btd", h_BTN, self.down_FD)
    return out if self.down_bias_D is None else out + self.down_bias_D


@struct.dataclass
class PerSequenceFFN:
  """Each sequence's own k rows of every neuron-major weight."""
  up_BKD: jax.Array
  down_BKD: jax.Array
  gate_BKD: Optional[jax.Array] = None
  up_bias_BK: Optional[jax.Array] = None
  down_bias_D: Optional[jax.Array] = None

  AXES = {"up_BKD": ("batch", "neurons", "embed"), "down_BKD": ("batch", "neurons", "embed"),
          "gate_BKD": ("batch", "neurons", "embed"), "up_bias_BK": ("batch", "neurons"),
          "down_bias_D": ("embed",)}

  @property
  def batch(self) -> int:
    return self.up_BKD.shape[0]

  def project_in(self, x_BTD: jax.Array) -> Tuple[jax.Array, Optional[jax.Array]]:
    up = jnp.einsum("btd,bkd->btk", x_BTD, self.up_BKD)
    if self.up_bias_BK is not None:
      up = up + self.up_bias_BK[:, None, :]
    gate = None if self.gate_BKD is None else jnp.einsum("btd,bkd->btk", x_BTD, self.gate_BKD)
    return up, gate

  def keep(self, h_BTK: jax.Array) -> jax.Array:
    return h_BTK

  def project_out(self, h_BTK: jax.Array) -> jax.Array:
    out = jnp.einsum("btk,bkd->btd", h_BTK, self.down_BKD)
    return out if self.down_bias_D is None else out + self.down_bias_D


@struct.dataclass
class MaskedFFN:
  """The dense rows, each sequence keeping only the neurons of `keep_BF` (1/0)."""
  dense: FFNParams
  keep_BF: jax.Array

  AXES = {"keep_BF": ("batch", "neurons")}

  def project_in(self, x_BTD: jax.Array) -> Tuple[jax.Array, Optional[jax.Array]]:
    return self.dense.project_in(x_BTD)

  def keep(self, h_BTF: jax.Array) -> jax.Array:
    return h_BTF * self.keep_BF[:, None, :].astype(h_BTF.dtype)

  def project_out(self, h_BTF: jax.Array) -> jax.Array:
    return self.dense.project_out(h_BTF)


FFN = Union[FFNParams, PerSequenceFFN, MaskedFFN]


class NeuronValues(NamedTuple):
  """One FFN's per-neuron values over a chunk, `[B, T, N]`.

  `values` is what the paper's signed rule ranks (h for gated FFNs; for ReLU
  FFNs the fc1 output before the ReLU, as the official code); `h` is the
  activation itself (what magnitude and GRIFFIN rank). For gated FFNs they
  are the same array."""
  values: jax.Array
  h: jax.Array


# The gate's activation of each gated `ModelConfig.ffn_activation`.
_GATE_ACTIVATIONS = {"silu_gated": jax.nn.silu,
                     "gelu_tanh_gated": functools.partial(jax.nn.gelu, approximate=True)}


def neuron_values(config: ModelConfig, ffn: FFN, x_BTD: jax.Array) -> NeuronValues:
  up, gate = ffn.project_in(x_BTD)
  if config.ffn_activation == "relu":
    return NeuronValues(up, jax.nn.relu(up))
  h = _GATE_ACTIVATIONS[config.ffn_activation](gate) * up
  return NeuronValues(h, h)


def ffn_output(ffn: FFN, h_BTN: jax.Array) -> jax.Array:
  """The block's output `[B, T, D]` from its activation (masked neurons dropped)."""
  return ffn.project_out(ffn.keep(h_BTN))
