"""Joint loss of per-layer budgets: candidates scored as rows of one batched pass.

Each calibration window's dense prefill (cache, each layer's neuron ranking,
first token) is computed once; a budget is a kept-neuron count per layer, and
since core sets of any size are prefixes of one per-layer ranking, one
executable scores every candidate budget (`budget_loss_fn`): each row keeps
its own top-ranked neurons (`MaskedFFN`), as decoding on the gathered rows
would compute.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from coreinfer_jax.core.spec import num_core_neurons
from coreinfer_jax.core.taps import RankRequest, ranking_tap, take_core
from coreinfer_jax.eval.scorer import continuation_fn
from coreinfer_jax.eval.tasks import Window
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.params import ModelParams
from coreinfer_jax.runtime.batching import left_pad
from coreinfer_jax.runtime.compile import CompiledFunctions
from coreinfer_jax.runtime.prefill import prefill

LOSSES = ("nll", "kl")


def loss_bound(kind: str, max_loss: float) -> float:
  """The bound in the loss's own units: log(1 + max_loss) for `nll`, nats for `kl`."""
  return math.log1p(max_loss) if kind == "nll" else max_loss


def ranking_prefill_fn(config: ModelConfig, cache_len: int, scoring: str, alpha: float):
  """(params, tokens [1, T], start [1]) -> (last log-probabilities [1, V],
  cache, per layer int32 [F]: each neuron's position in the core ranking, so
  that the core set of size k is {i : position[i] < k})."""
  request = RankRequest(scoring, alpha, config.intermediate_size)
  tap = ranking_tap(((request,),) * config.num_layers)

  def ranked(params: ModelParams, tokens_BT, start_B):
    logits_BV, cache, rankings = prefill(params, config, tokens_BT, start_B, tap, cache_len)
    return (jax.nn.log_softmax(logits_BV, axis=-1), cache,
            tuple(jnp.argsort(take_core(rankings, layer, request)[0]).astype(jnp.int32)
                  for layer in range(config.num_layers)))
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
    out = score(params, cache, inputs_CT, targets_CT, keep, None)
    return -out["logprob"].sum(axis=(1, 2)), out["kl"].sum(axis=(1, 2))
  return loss


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
