"""Tensor parallelism: the model's logical axes mapped onto a device mesh.

Every weight names its axes (`model/params.py`, `AXES`), so a placement is a
table from logical names to mesh axes, as in jax-llm-examples' llama3: on a
1-D mesh `("tp",)` the FFN is split by neurons (up/gate rows and down
columns, so a device holds a block of neurons), attention by heads (q, k, v
rows and o columns), the output matrix and embeddings by vocabulary, and the
KV cache by KV heads; norms and activations are replicated. XLA's SPMD
partitioner inserts the all-reduce after the row-parallel matmuls (o and
down) and the gathers the logits need. KV heads are replicated when the mesh
does not divide them (fewer KV heads than devices); query heads and neurons
must divide, else `check_tensor_parallel` refuses before anything loads.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from coreinfer_jax.model.cache import KVCache
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.ffn import NeuronValues
from coreinfer_jax.model.forward import Tap
from coreinfer_jax.model.params import logical_axes

TP = "tp"
# Logical axis -> mesh axis (absent: replicated).
TENSOR_PARALLEL_RULES: Dict[str, str] = {"heads": TP, "kv_heads": TP, "neurons": TP, "vocab": TP}


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
  """Refuses, in one line, a `tp` the model cannot be split by."""
  if tp < 1:
    raise ValueError(f"--tp must be at least 1, got {tp}")
  for what, size in (("attention heads", config.num_heads),
                     ("FFN neurons (intermediate_size)", config.intermediate_size)):
    if size % tp:
      raise ValueError(f"--tp={tp} does not divide the model's {size} {what}")


def make_mesh(tp: int, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh `("tp",)` over the first `tp` devices (default: all of JAX's)."""
  devices = list(jax.devices() if devices is None else devices)
  if tp > len(devices):
    raise ValueError(f"--tp={tp} asks for more devices than the {len(devices)} JAX sees")
  return Mesh(np.asarray(devices[:tp]), (TP,))


def tensor_parallel_mesh(config: ModelConfig, tp: int) -> Optional[Mesh]:
  """The mesh for `--tp` (None for one device), checked against the model and
  the machine before any weight loads."""
  check_tensor_parallel(config, tp)
  return None if tp == 1 else make_mesh(tp)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _spec(names: Sequence[str], shape: Sequence[int], mesh: Mesh, rules: Dict[str, str],
          units: Dict[str, int]) -> PartitionSpec:
  """Each dimension on its rule's mesh axis where that axis divides it: its
  `units` (heads, not head rows, so that no head is split) or its size."""
  axes = []
  for name, size in zip(names, shape):
    axis = rules.get(name)
    axes.append(axis if axis is not None and units.get(name, size) % mesh.shape[axis] == 0
                else None)
  return PartitionSpec(*axes)


def _units(config: ModelConfig) -> Dict[str, int]:
  return {"heads": config.num_heads, "kv_heads": config.num_kv_heads}


def param_shardings(params: Any, config: ModelConfig, mesh: Mesh,
                    rules: Dict[str, str] = TENSOR_PARALLEL_RULES) -> Any:
  """The tree of `NamedSharding`s placing `params` on `mesh` by their logical axes."""
  is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, str) for n in x)   # noqa: E731
  units = _units(config)
  return jax.tree_util.tree_map(
      lambda axes, array: NamedSharding(mesh, _spec(axes, array.shape, mesh, rules, units)),
      logical_axes(params), params, is_leaf=is_names)


def place_params(params: Any, config: ModelConfig, mesh: Mesh,
                 rules: Dict[str, str] = TENSOR_PARALLEL_RULES) -> Any:
  return jax.device_put(params, param_shardings(params, config, mesh, rules))


def cache_shardings(cache: KVCache, mesh: Mesh,
                    rules: Dict[str, str] = TENSOR_PARALLEL_RULES) -> KVCache:
  """The cache's placement: K `[B, KVH, hd, S]` and V `[B, KVH, S, hd]` by KV
  heads (replicated where the mesh does not divide them), the rest replicated."""
  k_names, v_names = ("batch", "kv_heads", "head_dim", "slots"), ("batch", "kv_heads", "slots", "head_dim")
  return KVCache(
      k=tuple(NamedSharding(mesh, _spec(k_names, k.shape, mesh, rules, {})) for k in cache.k),
      v=tuple(NamedSharding(mesh, _spec(v_names, v.shape, mesh, rules, {})) for v in cache.v),
      start_B=replicated(mesh), length=replicated(mesh))


def constrain_outputs(mesh: Optional[Mesh], cache: KVCache, host_read: Any) -> Tuple[KVCache, Any]:
  """Inside a jitted function, on a mesh: `cache` laid out as `cache_shardings`
  says, and what the host reads (`host_read`: tokens, core sets) replicated,
  so that every process, of one host or several, holds all of it. Without a
  mesh: both unchanged."""
  if mesh is None:
    return cache, host_read
  return (jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh)),
          jax.lax.with_sharding_constraint(host_read, replicated(mesh)))


def replicated_tap(tap: Optional[Tap], mesh: Optional[Mesh]) -> Optional[Tap]:
  """`tap` seeing each layer's neuron values replicated on every device: one
  all-gather of `[B, T, F]` per layer, after which selection runs on each
  device alone. Left on the neuron-sharded values, the token-wise top-m's
  bisection would all-reduce its counts once per pass and token block (600
  ms against 30 for SmolLM2's 128-token prefill on 3 CPU devices)."""
  if tap is None or mesh is None:
    return tap

  def on_every_device(layer: int, values: NeuronValues, real_BT: jax.Array):
    return tap(layer, jax.lax.with_sharding_constraint(values, replicated(mesh)), real_BT)
  return on_every_device
