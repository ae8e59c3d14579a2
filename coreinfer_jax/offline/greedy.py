"""Greedy per-layer β calibration on the measured joint loss, with held-out stopping.

`greedy_allocate` assumes no additivity. From all layers dense, each step
measures, for every layer, the joint loss of lowering that layer's β by
1/`steps` on top of the budgets chosen so far (every candidate a row of one
batch, `joint_loss.JointLoss`), and takes the cheapest. It stops at the FFN
target, or before the measured loss would pass the bound. Its own measurement
runs low (each step keeps the cheapest of many noisy candidates), so
`held_out_stop` re-measures each prefix of the trajectory on other windows.

The search is deterministic, so it resumes exactly: `on_step` is given the
trajectory after every step (the command saves it), and `resume` replays a
saved trajectory before measuring on from its end.
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


def greedy_allocate(config: ModelConfig, params: ModelParams, windows: Sequence[Window], *,
                    scoring: str, alpha: float, layers: Optional[Sequence[int]] = None,
                    kind: str = "nll", target_ffn_fraction: Optional[float] = None,
                    max_loss: Optional[float] = None, steps: int = 20, min_beta: float = 0.05,
                    rows_per_pass: int = 8, progress: bool = True,
                    resume: Sequence[GreedyStep] = (),
                    on_step: Optional[Callable[[List[GreedyStep]], None]] = None
                    ) -> GreedyAllocation:
  """Per-layer β chosen by measured joint loss (module docstring, 3): stop at
  mean FFN fraction `target_ffn_fraction`, or at the last step whose measured
  loss is within `max_loss` (`nll`: relative perplexity increase; `kl`: nats).
  `resume`: the steps of an interrupted search of the same settings, taken
  again without measuring; `on_step(trajectory)` is called after each step."""
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
  bound = None if max_loss is None else loss_bound(kind, max_loss)
  min_units = max(1, math.ceil(min_beta * steps - 1e-9))
  units = {layer: steps for layer in layers}
  betas = lambda u: [None if l not in u or u[l] == steps else u[l] / steps for l in range(L)]
  trajectory: List[GreedyStep] = list(resume)
  for step in trajectory:
    units[step.layer] = round(step.beta * steps)
  current = (trajectory[-1].nll, trajectory[-1].kl) if trajectory else (0.0, 0.0)
  bar = tqdm(desc="greedy calibration", disable=not progress)
  while target_ffn_fraction is None or kept_rows_fraction(betas(units), F) > target_ffn_fraction + 1e-12:
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
                                 kept_rows_fraction(betas(units), F), *current))
    if on_step:
      on_step(trajectory)
    bar.update(1)
    bar.set_postfix(ffn=f"{trajectory[-1].ffn_fraction:.3f}", nll=f"{current[0]:.4f}")
  bar.close()
  if measure.dense_nll is None:   # resumed at its end: measure the dense pass it reports
    measure([measure.kept(betas(units))])
  layer_beta = tuple(betas(units))
  return GreedyAllocation(layer_beta, kept_rows_fraction(layer_beta, F), current[0], current[1],
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
  within = np.flatnonzero((nll if kind == "nll" else kl) <= loss_bound(kind, max_loss) + 1e-12)
  return HeldOutStop(int(within.max()) + 1 if len(within) else 0, nll, kl, measure.dense_nll,
                     measure.tokens)
