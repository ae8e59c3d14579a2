"""Additive per-layer β calibration: single-layer sensitivities, exact allocation.

1. `measure_sensitivity`: on calibration windows (context prefilled densely,
   continuation scored as decoding would, as in `eval.scorer`), sparsify one
   layer alone at each β of a grid and record the increase of the
   continuation's mean negative log-likelihood (`nll`, log of the perplexity
   ratio) and the mean KL divergence to the dense model (`kl`). The (layer, β)
   cases are budgets scored by `joint_loss.JointLoss`: rows of one batch.
2. `allocate`: losses are taken as additive over layers, made non-increasing in
   β and interpolated linearly between measured β (loss 0 at β = 1); an exact
   dynamic programme over β in steps of 1/`steps` then minimises the predicted
   loss under a mean-FFN-fraction budget, or finds the smallest budget whose
   predicted loss stays within a bound. On SmolLM2 single-layer losses do not
   add up (errors compound), so this overshoots its bound; `greedy` measures
   what it allocates.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from coreinfer_jax.core.cost import kept_rows_fraction
from coreinfer_jax.eval.tasks import Window
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.params import ModelParams
from coreinfer_jax.offline.joint_loss import LOSSES, JointLoss, loss_bound


@dataclasses.dataclass
class Sensitivity:
  """Per (layer, β): mean increase of the continuation NLL and mean KL to dense."""
  betas: Tuple[float, ...]
  layers: Tuple[int, ...]
  nll_LB: np.ndarray          # float64 [len(layers), len(betas)]
  kl_LB: np.ndarray
  dense_nll: float            # mean NLL per continuation token, dense
  tokens: int

  def loss(self, kind: str) -> np.ndarray:
    if kind not in LOSSES:
      raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    return self.nll_LB if kind == "nll" else self.kl_LB

  @classmethod
  def from_record(cls, r: dict) -> "Sensitivity":
    return cls(tuple(r["betas"]), tuple(r["layers"]), np.asarray(r["nll"]), np.asarray(r["kl"]),
               r["dense_nll"], r["tokens"])

  def record(self) -> dict:
    return {"betas": list(self.betas), "layers": list(self.layers), "nll": self.nll_LB.tolist(),
            "kl": self.kl_LB.tolist(), "dense_nll": self.dense_nll, "tokens": self.tokens}


def measure_sensitivity(config: ModelConfig, params: ModelParams, windows: Sequence[Window], *,
                        betas: Sequence[float], scoring: str, alpha: float,
                        layers: Optional[Sequence[int]] = None, rows_per_pass: int = 8,
                        progress: bool = True, measured: Tuple[Sequence[float], ...] = ((), ()),
                        on_pass: Optional[Callable[[List[float], List[float]], None]] = None
                        ) -> Sensitivity:
  """Each (layer, β) of `layers` × `betas`, that layer alone sparsified, scored
  against the dense model on every window; `rows_per_pass` of them per batch.
  `measured`: (NLL, KL) of the first cases, from an interrupted run of the same
  settings (not measured again); `on_pass(nll, kl)` is called with every case
  measured so far after each batch."""
  L = config.num_layers
  layers = tuple(range(L)) if layers is None else tuple(layers)
  measure = JointLoss(config, params, windows, scoring=scoring, alpha=alpha,
                      rows_per_pass=rows_per_pass)
  cases = [measure.kept([beta if layer == sparse else None for layer in range(L)])
           for sparse in layers for beta in betas]
  nll, kl = list(measured[0]), list(measured[1])
  for start in tqdm(range(len(nll), len(cases), rows_per_pass), desc="sensitivity passes",
                    disable=not progress):
    pass_nll, pass_kl = measure(cases[start:start + rows_per_pass])
    nll += pass_nll.tolist()
    kl += pass_kl.tolist()
    if on_pass:
      on_pass(nll, kl)
  if measure.dense_nll is None:   # resumed at its end: measure the dense pass it reports
    measure(cases[:1])
  shape = (len(layers), len(betas))
  return Sensitivity(tuple(betas), layers, np.reshape(nll, shape), np.reshape(kl, shape),
                     measure.dense_nll, measure.tokens)


def loss_curves(sens: Sensitivity, kind: str, steps: int) -> np.ndarray:
  """float64 [layers, steps + 1]: predicted loss at β = u / steps, u = 0..steps
  (inf below the smallest measured β), non-increasing in β, 0 at β = 1."""
  falling = np.argsort(-np.asarray(sens.betas, np.float64))   # the measured β, largest first
  measured = np.maximum(sens.loss(kind)[:, falling], 0.0)
  # A layer's loss cannot shrink as it keeps fewer neurons: running max from β = 1 down.
  measured = np.maximum.accumulate(measured, axis=1)
  xs = np.append(np.asarray(sens.betas, np.float64)[falling][::-1], 1.0)   # ascending
  grid = np.arange(steps + 1) / steps
  curves = np.full((len(sens.layers), steps + 1), np.inf)
  usable = grid >= xs[0] - 1e-9
  for i in range(len(sens.layers)):
    curves[i, usable] = np.interp(grid[usable], xs, np.append(measured[i, ::-1], 0.0))
  return curves


def _dynamic_programme(curves: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(best loss [total units + 1], choice [layers, total units + 1]): the least
  summed loss at each exact total of β units, and each layer's units there."""
  n_layers, options = curves.shape
  total = (options - 1) * n_layers
  best = np.full(total + 1, np.inf)
  best[0] = 0.0
  choice = np.zeros((n_layers, total + 1), np.int64)
  for i in range(n_layers):
    new = np.full(total + 1, np.inf)
    for u in range(options):
      if not np.isfinite(curves[i, u]):
        continue
      candidate = np.full(total + 1, np.inf)
      candidate[u:] = best[:total + 1 - u] + curves[i, u]
      better = candidate < new
      new[better] = candidate[better]
      choice[i, better] = u
    best = new
  return best, choice


def _backtrack(choice: np.ndarray, units: int) -> List[int]:
  per_layer = []
  for i in range(choice.shape[0] - 1, -1, -1):
    u = int(choice[i, units])
    per_layer.append(u)
    units -= u
  return per_layer[::-1]


@dataclasses.dataclass
class Allocation:
  layer_beta: Tuple[Optional[float], ...]   # per model layer; None: dense
  predicted_loss: float
  ffn_fraction: float                         # mean kept FFN rows over all layers


def allocate(sens: Sensitivity, num_layers: int, num_neurons: int, *, kind: str = "nll",
             target_ffn_fraction: Optional[float] = None, max_loss: Optional[float] = None,
             steps: int = 20) -> Allocation:
  """Per-layer β minimising the predicted loss with mean FFN fraction at most
  `target_ffn_fraction`, or the smallest fraction whose predicted loss is at
  most `max_loss` (for `nll`: the relative perplexity increase, 0.05 = 5%;
  for `kl`: nats per token). Layers not measured stay dense."""
  if (target_ffn_fraction is None) == (max_loss is None):
    raise ValueError("give exactly one of target_ffn_fraction and max_loss")
  curves = loss_curves(sens, kind, steps)
  best, choice = _dynamic_programme(curves)
  dense_units = steps * (num_layers - len(sens.layers))   # unmeasured layers: β = 1

  def allocation(units: int) -> Allocation:
    betas: List[Optional[float]] = [None] * num_layers
    for layer, u in zip(sens.layers, _backtrack(choice, units)):
      betas[layer] = None if u == steps else u / steps
    return Allocation(tuple(betas), float(best[units]), kept_rows_fraction(betas, num_neurons))

  feasible = np.flatnonzero(np.isfinite(best))
  if target_ffn_fraction is not None:
    if not 0 < target_ffn_fraction <= 1:
      raise ValueError(f"target_ffn_fraction must be in (0, 1], got {target_ffn_fraction}")
    limit = math.floor(target_ffn_fraction * steps * num_layers + 1e-9) - dense_units
    for units_cap in range(limit, -1, -1):   # rounding k up can overshoot: tighten and retry
      within = feasible[feasible <= units_cap]
      if not len(within):
        break
      # The least loss; among equal losses the largest budget (more neurons kept).
      least = best[within].min()
      result = allocation(int(within[best[within] <= least + 1e-15].max()))
      if result.ffn_fraction <= target_ffn_fraction + 1e-12:
        return result
    smallest = min(sens.betas)
    raise ValueError(f"target_ffn_fraction {target_ffn_fraction} is below what the measured β "
                     f"grid allows (smallest β {smallest} in {len(sens.layers)} of {num_layers} "
                     "layers)")
  if max_loss <= 0:
    raise ValueError(f"max_loss must be positive, got {max_loss}")
  bound = loss_bound(kind, max_loss)
  within = feasible[best[feasible] <= bound + 1e-12]
  return allocation(int(within.min()))   # never empty: all dense has loss 0
