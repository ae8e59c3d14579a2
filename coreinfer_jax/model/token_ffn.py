"""Token-wise FFN kinds: each token's own neurons, chosen by a learned predictor.

The baseline CoreInfer argues against (Deja Vu, arXiv 2310.17157; PowerInfer):
a small predictor reads the FFN's input and names the neurons this token
will use, and the FFN computes those rows only, chosen anew at every token.

- `NeuronPredictor`: Deja Vu's predictor, two linear layers through a
  low-rank bottleneck (`[r, D]` then `[F, r]`, no activation between, as its
  code), giving each neuron's logit of being among the token's top neurons.
- `PredictedFFN` (decoding): the FFN's weights with every neuron a row,
  up/gate `[F, D]` and down stored transposed `[F, D]` (a column gather of
  `[D, F]` would read strided memory at every token), plus the predictor and
  k. `for_input(x)` predicts each token's top k and gathers those rows into
  a `PerTokenFFN`: inside the compiled step, predictor included.
- `PerTokenFFN`: each token's own k rows, `[B, T, k, D]` for every weight.
- `PredictedMaskedFFN` (scoring): the dense rows with rows of a batch that
  either keep a fixed set (`keep_BF`, as `MaskedFFN`) or, where `k_B > 0`,
  each token's predicted top `k_B`: `for_input` gives a `TokenMaskedFFN`
  (keep mask `[B, T, F]`), equal to `PerTokenFFN` to float rounding.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import struct

from coreinfer_jax.model.ffn import FFNParams, column_norms


@struct.dataclass
class NeuronPredictor:
  """One layer's predictor: logits `[B, T, F]` = (x down_RDᵀ) up_FRᵀ."""
  down_RD: jax.Array
  up_FR: jax.Array

  AXES = {"down_RD": ("predictor_rank", "embed"), "up_FR": ("neurons", "predictor_rank")}

  @property
  def rank(self) -> int:
    return self.down_RD.shape[0]

  @jax.named_scope("predictor")
  def logits(self, x_BTD: jax.Array) -> jax.Array:
    low_BTR = jnp.einsum("btd,rd->btr", x_BTD, self.down_RD.astype(x_BTD.dtype))
    return jnp.einsum("btr,fr->btf", low_BTR, self.up_FR.astype(x_BTD.dtype),
                      preferred_element_type=jnp.float32)

  def top(self, x_BTD: jax.Array, k: int) -> jax.Array:
    """int32 [B, T, k]: each token's k neurons of highest logit, highest first."""
    return jax.lax.top_k(self.logits(x_BTD), k)[1]


@struct.dataclass
class PerTokenFFN:
  """Each token's own k neurons of every weight (rows, `[B, T, k, D]`)."""
  up_BTKD: jax.Array
  down_BTKD: jax.Array
  gate_BTKD: Optional[jax.Array] = None
  up_bias_BTK: Optional[jax.Array] = None
  down_bias_D: Optional[jax.Array] = None

  AXES = {"up_BTKD": ("batch", None, "neurons", "embed"),
          "down_BTKD": ("batch", None, "neurons", "embed"),
          "gate_BTKD": ("batch", None, "neurons", "embed"),
          "up_bias_BTK": ("batch", None, "neurons"),
          "down_bias_D": ("embed",)}

  def for_input(self, x_BTD: jax.Array) -> "PerTokenFFN":
    return self

  @jax.named_scope("ffn_in")
  def project_in(self, x_BTD: jax.Array) -> Tuple[jax.Array, Optional[jax.Array]]:
    up = jnp.einsum("btd,btkd->btk", x_BTD, self.up_BTKD)
    if self.up_bias_BTK is not None:
      up = up + self.up_bias_BTK
    gate = None if self.gate_BTKD is None else jnp.einsum("btd,btkd->btk", x_BTD, self.gate_BTKD)
    return up, gate

  def keep(self, h_BTK: jax.Array) -> jax.Array:
    return h_BTK

  def out_norms(self) -> jax.Array:
    return column_norms(self.down_BTKD, axis=-1)

  @jax.named_scope("ffn_out")
  def project_out(self, h_BTK: jax.Array) -> jax.Array:
    out = jnp.einsum("btk,btkd->btd", h_BTK, self.down_BTKD)
    return out if self.down_bias_D is None else out + self.down_bias_D


@struct.dataclass
class PredictedFFN:
  """A layer decoded on each token's predicted top `k` neurons."""
  up_FD: jax.Array
  down_FD: jax.Array                       # down_DF transposed: neuron i is row i
  predictor: NeuronPredictor
  gate_FD: Optional[jax.Array] = None
  up_bias_F: Optional[jax.Array] = None
  down_bias_D: Optional[jax.Array] = None
  k: int = struct.field(pytree_node=False, default=1)

  AXES = {"up_FD": ("neurons", "embed"), "down_FD": ("neurons", "embed"),
          "gate_FD": ("neurons", "embed"), "up_bias_F": ("neurons",), "down_bias_D": ("embed",)}

  @classmethod
  def from_dense(cls, ffn: FFNParams, predictor: NeuronPredictor, k: int) -> "PredictedFFN":
    """(Makes the transposed copy of down: one more `[F, D]` matrix in memory.)"""
    return cls(up_FD=ffn.up_FD, down_FD=ffn.down_DF.T,
               predictor=predictor, gate_FD=ffn.gate_FD, up_bias_F=ffn.up_bias_F,
               down_bias_D=ffn.down_bias_D, k=k)

  @property
  def num_neurons(self) -> int:
    return self.up_FD.shape[0]

  def for_input(self, x_BTD: jax.Array) -> PerTokenFFN:
    rows_BTK = self.predictor.top(x_BTD, self.k)
    with jax.named_scope("token_gather"):
      take = lambda w: None if w is None else w[rows_BTK]   # noqa: E731
      return PerTokenFFN(up_BTKD=take(self.up_FD), down_BTKD=take(self.down_FD),
                         gate_BTKD=take(self.gate_FD), up_bias_BTK=take(self.up_bias_F),
                         down_bias_D=self.down_bias_D)


@struct.dataclass
class TokenMaskedFFN:
  """The dense rows, each token keeping only the neurons of `keep_BTF` (1/0)."""
  dense: FFNParams
  keep_BTF: jax.Array

  AXES = {"keep_BTF": ("batch", None, "neurons")}

  def for_input(self, x_BTD: jax.Array) -> "TokenMaskedFFN":
    return self

  def project_in(self, x_BTD: jax.Array) -> Tuple[jax.Array, Optional[jax.Array]]:
    return self.dense.project_in(x_BTD)

  def keep(self, h_BTF: jax.Array) -> jax.Array:
    return h_BTF * self.keep_BTF.astype(h_BTF.dtype)

  def out_norms(self) -> jax.Array:
    return self.dense.out_norms()

  def project_out(self, h_BTF: jax.Array) -> jax.Array:
    return self.dense.project_out(h_BTF)


def predicted_mask(predictor: NeuronPredictor, x_BTD: jax.Array, k_B: jax.Array,
                   k_max: int) -> jax.Array:
  """float32 [B, T, F]: 1 at each token's predicted top `k_B[b]` neurons
  (the first `k_B[b]` of its top `k_max`: `lax.top_k` orders ties by index,
  so they are the neurons `top(x, k_B[b])` picks)."""
  rows_BTK = predictor.top(x_BTD, k_max)
  B, T, K = rows_BTK.shape
  kept_BTK = (jnp.arange(K)[None, None, :] < k_B[:, None, None]).astype(jnp.float32)
  b, t = jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None]
  return jnp.zeros((B, T, predictor.up_FR.shape[0]), jnp.float32).at[b, t, rows_BTK].set(kept_BTK)


@struct.dataclass
class PredictedMaskedFFN:
  """Scoring rows: row b keeps `keep_BF[b]` where `k_B[b]` is 0, else each
  token's predicted top `k_B[b]` (`k_max` ≥ every `k_B`)."""
  dense: FFNParams
  keep_BF: jax.Array
  predictor: NeuronPredictor
  k_B: jax.Array
  k_max: int = struct.field(pytree_node=False, default=1)

  AXES = {"keep_BF": ("batch", "neurons"), "k_B": ("batch",)}

  def for_input(self, x_BTD: jax.Array) -> TokenMaskedFFN:
    predicted_BTF = predicted_mask(self.predictor, x_BTD, self.k_B, self.k_max)
    keep_BTF = jnp.where(self.k_B[:, None, None] > 0, predicted_BTF,
                         self.keep_BF[:, None, :].astype(jnp.float32))
    return TokenMaskedFFN(self.dense, keep_BTF)
