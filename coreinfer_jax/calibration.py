"""Per-layer β calibrated on data: measure each layer's sensitivity, allocate budgets.

1. `measure_sensitivity`: on calibration windows (context prefilled densely,
   continuation scored as decoding would, as in `scoring`), sparsify one layer
   alone at each β of a grid and record the increase of the continuation's
   mean negative log-likelihood (`nll`, log of the perplexity ratio) and the
   mean KL divergence to the dense model (`kl`). The (layer, β) cases are
   budgets scored by `JointLoss` (below): rows of one batch that drop each
   row's non-core neurons (h[i] = 0, GUIDE §1), one executable of dense shapes.
2. `allocate`: losses are taken as additive over layers, made non-increasing in
   β and interpolated linearly between measured β (loss 0 at β = 1); an exact
   dynamic programme over β in steps of 1/`steps` then minimises the predicted
   loss under a mean-FFN-fraction budget, or finds the smallest budget whose
   predicted loss stays within a bound.
3. `greedy_allocate`: no additivity assumed. From all layers dense, each step
   measures, for every layer, the joint loss of lowering that layer's β by
   1/`steps` on top of the budgets chosen so far (every candidate a row of one
   batch), and takes the cheapest. It stops at the FFN target, or before the
   measured loss would pass the bound. On SmolLM2 single-layer losses do not
   add up (errors compound), so (2) overshoots its bound; (3) measures what it
   allocates. The dense prefill of each window (cache and each layer's neuron
   ranking) is computed once; core sets of any size are prefixes of the
   ranking, so one executable serves every candidate budget.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from coreinfer_jax.config import ModelConfig
from coreinfer_jax.core import core_spec, num_core_neurons
from coreinfer_jax.generation import CompiledFunctions, left_pad
from coreinfer_jax.params import ModelParams
from coreinfer_jax.scoring import continuation_fn, prefill_fn
from coreinfer_jax.tasks import Window

LOSSES = ("nll", "kl")


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
                        progress: bool = True) -> Sensitivity:
  """Each (layer, β) of `layers` × `betas`, that layer alone sparsified, scored
  against the dense model on every window; `rows_per_pass` of them per batch."""
  L = config.num_layers
  layers = tuple(range(L)) if layers is None else tuple(layers)
  measure = JointLoss(config, params, windows, scoring=scoring, alpha=alpha,
                      rows_per_pass=rows_per_pass)
  cases = [[beta if layer == sparse else None for layer in range(L)]
           for sparse in layers for beta in betas]
  nll, kl = measure([measure.kept(case) for case in cases], progress=progress)
  shape = (len(layers), len(betas))
  return Sensitivity(tuple(betas), layers, nll.reshape(shape), kl.reshape(shape),
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


def ffn_fraction(layer_beta: Sequence[Optional[float]], num_neurons: int) -> float:
  """Kept FFN rows over all rows (every layer has `num_neurons`)."""
  kept = [num_neurons if b is None else num_core_neurons(b, num_neurons) for b in layer_beta]
  return sum(kept) / (num_neurons * len(kept))


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
    return Allocation(tuple(betas), float(best[units]), ffn_fraction(betas, num_neurons))

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
  bound = math.log1p(max_loss) if kind == "nll" else max_loss
  within = feasible[best[feasible] <= bound + 1e-12]
  return allocation(int(within.min()))   # never empty: all dense has loss 0


def ranking_prefill_fn(config: ModelConfig, cache_len: int, scoring: str, alpha: float):
  """(params, tokens [1, T], start [1]) -> (last log-probabilities [1, V],
  cache, per layer int32 [F]: each neuron's position in the core ranking, so
  that the core set of size k is {i : position[i] < k})."""
  full = core_spec(config.num_layers, config.intermediate_size, beta=1.0, alpha=alpha,
                   scoring=scoring, sparse_layers="all")
  prefill = prefill_fn(config, cache_len, (full,))

  def ranked(params: ModelParams, tokens_BT, start_B):
    first, cache, (cores,) = prefill(params, tokens_BT, start_B)
    return first, cache, tuple(jnp.argsort(order[0]).astype(jnp.int32) for order in cores)
  return ranked


def budget_loss_fn(config: ModelConfig):
  """(params, cache, inputs [1, T], targets [1, T], per layer positions [F],
  kept neurons int32 [R, L]) -> (summed NLL [R], summed KL to row 0 [R]) of the
  continuation after its first token, row r keeping `kept[r, l]` top-ranked
  neurons at layer l."""
  score = continuation_fn(config, reference=0)

  def loss(params: ModelParams, cache, inputs_CT, targets_CT, positions, kept_RL):
    keep = tuple((pos[None, :] < kept_RL[:, layer, None]).astype(jnp.float32)
                 for layer, pos in enumerate(positions))
    out = score(params, cache, inputs_CT, targets_CT, keep)
    return -out["logprob"].sum(axis=(1, 2)), out["kl"].sum(axis=(1, 2))
  return loss


@dataclasses.dataclass
class GreedyStep:
  layer: int
  beta: float
  ffn_fraction: float
  nll: float       # mean NLL increase per continuation token over dense (log perplexity ratio)
  kl: float        # mean KL to dense per continuation token


@dataclasses.dataclass
class GreedyAllocation:
  layer_beta: Tuple[Optional[float], ...]   # per model layer; None: dense
  ffn_fraction: float                         # mean kept FFN rows over all layers
  measured_nll: float                         # on the calibration windows, as GreedyStep
  measured_kl: float
  dense_nll: float                            # mean NLL per token of the dense model
  tokens: int                                 # continuation tokens measured
  trajectory: List[GreedyStep]                # every step taken, in order


class JointLoss:
  """Measures per-layer budgets jointly on fixed windows: each window's dense
  pass (cache, neuron ranking, first token) is computed once; `__call__` scores
  candidate budgets (int [L] kept neurons each) as rows of batched passes."""

  def __init__(self, config: ModelConfig, params: ModelParams, windows: Sequence[Window], *,
               scoring: str, alpha: float, rows_per_pass: int = 8):
    self.config, self.params, self.rows_per_pass = config, params, rows_per_pass
    context_len = max(len(w.context) for w in windows)
    continuation_len = max(len(w.continuation) for w in windows)
    self.compiled = CompiledFunctions()
    self._loss = budget_loss_fn(config)
    prefill = ranking_prefill_fn(config, context_len + continuation_len, scoring, alpha)
    self.prefilled, self.tokens = [], 0
    for w in windows:
      tokens_BT, start_B = left_pad([w.context], context_len)
      first_logprobs, cache, positions = self.compiled("prefill", prefill, params,
                                                       jnp.asarray(tokens_BT), jnp.asarray(start_B))
      ids = np.asarray(w.continuation, np.int32)
      self.prefilled.append((cache, positions, jnp.asarray(ids[None, :-1]),
                             jnp.asarray(ids[None, 1:]), float(first_logprobs[0, ids[0]])))
      self.tokens += len(ids)   # the first token is dense in every row: no loss
    self.dense_nll = None

  def kept(self, layer_beta: Sequence[Optional[float]]) -> np.ndarray:
    F = self.config.intermediate_size
    return np.array([F if b is None else num_core_neurons(b, F) for b in layer_beta])

  def __call__(self, candidates: Sequence[np.ndarray],
               progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """(NLL increase over dense [n], KL to dense [n]), per continuation token."""
    L, F = self.config.num_layers, self.config.intermediate_size
    nll, kl = np.zeros(len(candidates)), np.zeros(len(candidates))
    dense = 0.0
    for chunk in tqdm(range(0, len(candidates), self.rows_per_pass), desc="calibration passes",
                      disable=not progress):
      group = list(candidates[chunk:chunk + self.rows_per_pass])
      rows = np.stack([np.full(L, F)] + group + [group[-1]] * (self.rows_per_pass - len(group)))
      for cache, positions, inputs, targets, first in self.prefilled:
        row_nll, row_kl = self.compiled("loss", self._loss, self.params, cache, inputs, targets,
                                        positions, jnp.asarray(rows, jnp.int32))
        row_nll, row_kl = np.asarray(row_nll, np.float64), np.asarray(row_kl, np.float64)
        nll[chunk:chunk + len(group)] += row_nll[1:1 + len(group)] - row_nll[0]
        kl[chunk:chunk + len(group)] += row_kl[1:1 + len(group)]
        dense += row_nll[0] - first if chunk == 0 else 0.0
    self.dense_nll = dense / self.tokens
    return nll / self.tokens, kl / self.tokens


def _loss_bound(kind: str, max_loss: float) -> float:
  return math.log1p(max_loss) if kind == "nll" else max_loss


def greedy_allocate(config: ModelConfig, params: ModelParams, windows: Sequence[Window], *,
                    scoring: str, alpha: float, layers: Optional[Sequence[int]] = None,
                    kind: str = "nll", target_ffn_fraction: Optional[float] = None,
                    max_loss: Optional[float] = None, steps: int = 20, min_beta: float = 0.05,
                    rows_per_pass: int = 8, progress: bool = True) -> GreedyAllocation:
  """Per-layer β chosen by measured joint loss (module docstring, 3): stop at
  mean FFN fraction `target_ffn_fraction`, or at the last step whose measured
  loss is within `max_loss` (`nll`: relative perplexity increase; `kl`: nats)."""
  if (target_ffn_fraction is None) == (max_loss is None):
    raise ValueError("give exactly one of target_ffn_fraction and max_loss")
  if kind not in LOSSES:
    raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
  if target_ffn_fraction is not None and not 0 < target_ffn_fraction <= 1:
    raise ValueError(f"target_ffn_fraction must be in (0, 1], got {target_ffn_fraction}")
  if max_loss is not None and max_loss <= 0:
    raise ValueError(f"max_loss must be positive, got {max_loss}")
  L, F = config.num_layers, config.intermediate_size
  layers = tuple(range(L)) if layers is None else tuple(layers)
  measure = JointLoss(config, params, windows, scoring=scoring, alpha=alpha,
                      rows_per_pass=rows_per_pass)
  bound = None if max_loss is None else _loss_bound(kind, max_loss)
  min_units = max(1, math.ceil(min_beta * steps - 1e-9))
  units = {layer: steps for layer in layers}
  betas = lambda u: [None if l not in u or u[l] == steps else u[l] / steps for l in range(L)]
  trajectory: List[GreedyStep] = []
  current = (0.0, 0.0)
  bar = tqdm(desc="greedy calibration", disable=not progress)
  while target_ffn_fraction is None or ffn_fraction(betas(units), F) > target_ffn_fraction + 1e-12:
    movable = [layer for layer in layers if units[layer] > min_units]
    if not movable:
      if target_ffn_fraction is not None:
        raise ValueError(f"target_ffn_fraction {target_ffn_fraction} is below what min_beta "
                         f"{min_beta} allows in {len(layers)} of {L} layers")
      break
    trials = [{**units, layer: units[layer] - 1} for layer in movable]
    nll, kl = measure([measure.kept(betas(t)) for t in trials])
    losses = nll if kind == "nll" else kl
    best = int(np.argmin(losses))      # ties: the earliest layer
    if bound is not None and losses[best] > bound + 1e-12:
      break
    units = trials[best]
    current = (float(nll[best]), float(kl[best]))
    trajectory.append(GreedyStep(movable[best], units[movable[best]] / steps,
                                 ffn_fraction(betas(units), F), *current))
    bar.update(1)
    bar.set_postfix(ffn=f"{trajectory[-1].ffn_fraction:.3f}", nll=f"{current[0]:.4f}")
  bar.close()
  layer_beta = tuple(betas(units))
  return GreedyAllocation(layer_beta, ffn_fraction(layer_beta, F), current[0], current[1],
                          measure.dense_nll or 0.0, measure.tokens, trajectory)


def trajectory_budgets(trajectory: Sequence[GreedyStep], num_layers: int
                       ) -> List[Tuple[Optional[float], ...]]:
  """Per-layer β after each step of a greedy trajectory."""
  layer_beta: List[Optional[float]] = [None] * num_layers
  out = []
  for step in trajectory:
    layer_beta[step.layer] = step.beta
    out.append(tuple(layer_beta))
  return out


@dataclasses.dataclass
class HeldOutStop:
  chosen: int                 # steps of the trajectory kept (0: none)
  nll: np.ndarray             # per step, measured on the held-out windows
  kl: np.ndarray
  dense_nll: float
  tokens: int


def held_out_stop(config: ModelConfig, params: ModelParams, windows: Sequence[Window],
                  trajectory: Sequence[GreedyStep], *, scoring: str, alpha: float,
                  kind: str, max_loss: float, rows_per_pass: int = 8) -> HeldOutStop:
  """Early stopping on held-out windows: the greedy search picks each step on
  its calibration windows, taking the cheapest of many noisy candidates, so
  its own measurement runs low. Each prefix of the trajectory is measured
  jointly on other windows, and the prefix up to the deepest step whose loss
  there is within `max_loss` is kept."""
  measure = JointLoss(config, params, windows, scoring=scoring, alpha=alpha,
                      rows_per_pass=rows_per_pass)
  budgets = trajectory_budgets(trajectory, config.num_layers)
  nll, kl = measure([measure.kept(b) for b in budgets])
  within = np.flatnonzero((nll if kind == "nll" else kl) <= _loss_bound(kind, max_loss) + 1e-12)
  return HeldOutStop(int(within.max()) + 1 if len(within) else 0, nll, kl, measure.dense_nll,
                     measure.tokens)
