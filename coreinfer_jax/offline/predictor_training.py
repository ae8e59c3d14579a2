"""Trains one neuron predictor per layer (Deja Vu's recipe), resumably, with optax.

Every predicted layer's `NeuronPredictor` (low rank r) is trained at once:
the weights are stacked over layers (`[L, r, D]`, `[L, F, r]`), the loss is
the mean binary cross-entropy of each token's logits against its packed
labels (`predictor_data`), summed over layers (each layer's gradient is its
own), and AdamW follows a warmup-cosine schedule. Step s draws its batch of
tokens from `fold_in(key, s)`, so a run is a function of its seed and the
state at any step: resumed from a checkpoint, it continues exactly as an
uninterrupted run would (tested bit for bit).

Checkpoints (orbax `CheckpointManager`, the parameters, the optimizer state
and the losses so far) are written every `checkpoint_every` steps into a
work folder named by everything the run depends on; `train` restores the
latest one it finds there.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from coreinfer_jax.core.spec import num_core_neurons
from coreinfer_jax.offline.predictor_data import unpack_bits

Params = Dict[str, jax.Array]   # "down_LRD" [L, r, D], "up_LFR" [L, F, r]


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  rank: int
  steps: int
  batch_tokens: int
  learning_rate: float
  warmup_steps: int
  weight_decay: float
  seed: int
  checkpoint_every: int

  def check(self) -> None:
    for name in ("rank", "steps", "batch_tokens", "checkpoint_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
    if not 0 <= self.warmup_steps < self.steps:
      raise ValueError(f"--warmup_steps must be in [0, --steps), got {self.warmup_steps}")
    if self.learning_rate <= 0 or self.weight_decay < 0:
      raise ValueError("--learning_rate must be > 0 and --weight_decay ≥ 0")


@dataclasses.dataclass
class TrainResult:
  params: Params
  losses: List[float]          # the training loss of every step
  resumed_from: int            # the step restored from a checkpoint (0: none)
  seconds: float               # this call's training time (restoring excluded)


def init_params(key: jax.Array, num_layers: int, rank: int, width: int, neurons: int) -> Params:
  """LeCun-normal weights (variance 1/fan-in) for both factors."""
  down_key, up_key = jax.random.split(key)
  return {"down_LRD": jax.random.normal(down_key, (num_layers, rank, width)) / np.sqrt(width),
          "up_LFR": jax.random.normal(up_key, (num_layers, neurons, rank)) / np.sqrt(rank)}


def logits(params: Params, x_NLD: jax.Array) -> jax.Array:
  """float32 [N, L, F]: every layer's predictor on its own inputs."""
  low = jnp.einsum("nld,lrd->nlr", x_NLD, params["down_LRD"])
  return jnp.einsum("nlr,lfr->nlf", low, params["up_LFR"])


def optimizer(s: TrainSettings) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, s.learning_rate, s.warmup_steps, s.steps,
                                                end_value=s.learning_rate * 0.1)
  return optax.adamw(schedule, weight_decay=s.weight_decay)


def train_step_fn(s: TrainSettings, num_neurons: int):
  """(state, step, x [N, L, D], packed labels [N, L, P]) -> (state, loss): one
  AdamW step on `batch_tokens` drawn tokens; the state is {"params",
  "opt_state", "losses" (float32 [steps], this step's written)}."""
  tx = optimizer(s)
  key = jax.random.key(s.seed)

  def step_fn(state, step, x_NLD, labels_NLP):
    rows = jax.random.randint(jax.random.fold_in(key, step), (s.batch_tokens,), 0,
                              x_NLD.shape[0])
    x, labels = x_NLD[rows], unpack_bits(labels_NLP[rows], num_neurons)

    def loss_fn(p):
      bce = optax.sigmoid_binary_cross_entropy(logits(p, x), labels)   # [N, L, F]
      return bce.mean(axis=(0, 2)).sum()   # each layer's mean, summed
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    loss = loss / x_NLD.shape[1]
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
            "losses": state["losses"].at[step].set(loss)}, loss
  return step_fn


def recall(params: Params, x_NLD: np.ndarray, top_NLEP: np.ndarray, betas: Sequence[float],
           num_neurons: int, chunk: int = 1024) -> Dict[str, object]:
  """Per β: the mean, over held-out tokens, of |predicted top k ∩ true top k| / k,
  k = round(β·F); overall and per layer (in the stacked order)."""
  @jax.jit
  def hits(p, x, top):
    z = logits(p, x)
    out = []
    for j, beta in enumerate(betas):
      k = num_core_neurons(beta, num_neurons)
      predicted = jax.lax.top_k(z, k)[1]
      true = unpack_bits(top[:, :, j], num_neurons)
      out.append(jnp.take_along_axis(true, predicted, axis=-1).sum(axis=(0, 2)) / k)
    return jnp.stack(out)   # [E, L]: summed over tokens
  total = np.zeros((len(betas), x_NLD.shape[1]))
  for first in range(0, x_NLD.shape[0], chunk):
    total += np.asarray(hits(params, jnp.asarray(x_NLD[first:first + chunk]),
                             jnp.asarray(top_NLEP[first:first + chunk])))
  per_layer = total / x_NLD.shape[0]
  return {f"{beta:g}": {"mean": float(per_layer[j].mean()),
                        "per_layer": [round(float(v), 4) for v in per_layer[j]]}
          for j, beta in enumerate(betas)}


def _manager(work_dir: str, every: int):
  import orbax.checkpoint as ocp
  # Synchronous: a checkpoint is complete when `save` returns, so an
  # interrupt at any later point leaves it to resume from.
  return ocp.CheckpointManager(os.path.abspath(work_dir), options=ocp.CheckpointManagerOptions(
      max_to_keep=2, save_interval_steps=every, enable_async_checkpointing=False))


def train(x_NLD: np.ndarray, labels_NLP: np.ndarray, num_neurons: int, s: TrainSettings, *,
          work_dir: Optional[str] = None, progress: bool = False,
          on_step: Optional[Callable[[int], None]] = None) -> TrainResult:
  """Trains the stacked predictors on every token of `x_NLD` / `labels_NLP`.
  With `work_dir`, checkpoints every `s.checkpoint_every` steps there and
  resumes from the latest found. `on_step(step)` runs after each step
  (tests interrupt a run through it)."""
  import orbax.checkpoint as ocp
  s.check()
  _, L, D = x_NLD.shape
  tx = optimizer(s)
  params = init_params(jax.random.key(s.seed + 1), L, s.rank, D, num_neurons)
  state = {"params": params, "opt_state": tx.init(params),
           "losses": jnp.zeros((s.steps,), jnp.float32)}
  manager = _manager(work_dir, s.checkpoint_every) if work_dir else None
  start = 0
  if manager is not None and manager.latest_step() is not None:
    start = manager.latest_step()
    state = manager.restore(start, args=ocp.args.StandardRestore(jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)))
  step_fn = jax.jit(train_step_fn(s, num_neurons))
  x, labels = jnp.asarray(x_NLD), jnp.asarray(labels_NLP)
  t0 = time.perf_counter()
  bar = tqdm(range(start, s.steps), desc="train", unit="step", disable=not progress,
             initial=start, total=s.steps)
  for step in bar:
    state, loss = step_fn(state, jnp.int32(step), x, labels)
    done = step + 1
    if manager is not None and (done % s.checkpoint_every == 0 or done == s.steps):
      manager.save(done, args=ocp.args.StandardSave(state), force=True)
    if progress and done % 20 == 0:
      bar.set_postfix(loss=f"{float(loss):.4f}")
    if on_step is not None:
      on_step(done)
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  return TrainResult(jax.device_get(state["params"]),
                     [float(v) for v in np.asarray(state["losses"])], start,
                     time.perf_counter() - t0)
