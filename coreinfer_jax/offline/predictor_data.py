"""A neuron predictor's training data: the dense model's FFN inputs and each
token's top neurons, tapped from the dense prefill over calibration text.

Per real token and predicted layer, one pass keeps
- `x`: the FFN's input `[D]` (float32), what the predictor reads;
- `labels`: the token's top ⌊label_fraction·F⌉ neurons by |h| (Deja Vu's
  recipe: the labels are the dense model's own activations), packed 8 to a byte;
- `top_<j>`: its top round(β_j·F) neurons for each evaluation β_j (packed),
  the sets the predictor's recall is measured against.
Passes are resumable (`batch_pass`).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from coreinfer_jax.core import selection
from coreinfer_jax.core.spec import num_core_neurons
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.ffn import NeuronValues
from coreinfer_jax.model.params import ModelParams
from coreinfer_jax.offline import batch_pass
from coreinfer_jax.runtime.compile import CompiledFunctions
from coreinfer_jax.runtime.prefill import prefill


@dataclasses.dataclass(frozen=True)
class LabelPlan:
  """Which layers' data a pass keeps, and which top sets."""
  layers: Tuple[int, ...]
  label_fraction: float
  eval_betas: Tuple[float, ...]

  def fractions(self) -> Tuple[float, ...]:
    return (self.label_fraction,) + self.eval_betas


@dataclasses.dataclass
class TokenData:
  """Every real token's data, stacked over the plan's layers."""
  x_NLD: np.ndarray          # float32
  labels_NLP: np.ndarray     # uint8, packed [F] bits
  top_NLEP: np.ndarray       # uint8 [N, L, len(eval_betas), packed F]
  text_N: np.ndarray         # int32: each token's text (to split by text)


def pack_bits(mask_BTF: jax.Array) -> jax.Array:
  """uint8 [..., ceil(F/8)]: `mask` 8 neurons to a byte, first neuron in the
  high bit (numpy's `packbits` order)."""
  F = mask_BTF.shape[-1]
  padded = jnp.pad(mask_BTF.astype(jnp.uint8), [(0, 0)] * (mask_BTF.ndim - 1) + [(0, -F % 8)])
  bytes_ = padded.reshape(padded.shape[:-1] + (-1, 8))
  weights = jnp.asarray([128, 64, 32, 16, 8, 4, 2, 1], jnp.uint8)
  return jnp.sum(bytes_ * weights, axis=-1, dtype=jnp.uint8)


def unpack_bits(packed: jax.Array, num_neurons: int) -> jax.Array:
  """float32 [..., F]: the inverse of `pack_bits`."""
  shifts = jnp.arange(7, -1, -1, dtype=jnp.uint8)
  bits = (packed[..., None] >> shifts) & 1
  return bits.reshape(packed.shape[:-1] + (-1,))[..., :num_neurons].astype(jnp.float32)


def top_masks(h_BTF: jax.Array, counts: Sequence[int]) -> jax.Array:
  """uint8 [B, T, len(counts), packed F]: each token's top `counts[j]` by |h|
  (`selection.top_m_mask`: exact, ties to the lower index; far faster than
  `lax.top_k` with k in the thousands on XLA:CPU)."""
  magnitude = jnp.abs(h_BTF.astype(jnp.float32))
  m_BT = lambda m: jnp.full(magnitude.shape[:2], m, jnp.int32)   # noqa: E731
  return jnp.stack([pack_bits(selection.top_m_mask(magnitude, m_BT(m))) for m in counts], axis=2)


def token_data_fn(config: ModelConfig, plan: LabelPlan):
  """(params, tokens [B, T], start [B]) -> {"x": float32 [B, T, L, D],
  "masks": uint8 [B, T, L, 1 + E, packed F]}: one dense pass."""
  counts = [num_core_neurons(f, config.intermediate_size) for f in plan.fractions()]
  wanted = set(plan.layers)

  def tap(layer: int, values: NeuronValues, real_BT: jax.Array):
    if layer not in wanted:
      return None
    return values.inputs.astype(jnp.float32), top_masks(values.h, counts)

  def run(params: ModelParams, tokens_BT, start_B):
    _, _, tapped = prefill(params, config, tokens_BT, start_B, tap, cache_len=tokens_BT.shape[1])
    return {"x": jnp.stack([tapped[i][0] for i in plan.layers], axis=2),
            "masks": jnp.stack([tapped[i][1] for i in plan.layers], axis=2)}
  return run


def collect(params: ModelParams, config: ModelConfig, token_ids: Sequence[Sequence[int]],
            plan: LabelPlan, *, batch_size: int, work_dir: Optional[str] = None,
            progress: bool = False) -> Tuple[TokenData, batch_pass.BatchPass]:
  """The plan's data for every real token of `token_ids` (text order), and
  the pass (its computed and resumed batches, seconds)."""
  compiled = CompiledFunctions()
  fn = token_data_fn(config, plan)

  def compute(tokens_BT, start_B) -> Dict[str, np.ndarray]:
    out = jax.device_get(compiled("token_data", fn, params, tokens_BT, start_B))
    real_BT = np.arange(tokens_BT.shape[1])[None, :] >= np.asarray(start_B)[:, None]
    return {"x": out["x"][real_BT], "masks": out["masks"][real_BT],
            "lengths": real_BT.sum(axis=1).astype(np.int32)}

  batches = batch_pass.BatchPass()
  shards = batches.run(token_ids, batch_size, compute, work_dir=work_dir, progress=progress,
                       desc="dense pass")
  masks = np.concatenate([s["masks"] for s in shards])
  lengths = np.concatenate([s["lengths"] for s in shards])
  return TokenData(np.concatenate([s["x"] for s in shards]), masks[:, :, 0], masks[:, :, 1:],
                   np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)), batches
