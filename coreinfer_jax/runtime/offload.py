"""Memory-limit mode: the sparsified layers' FFN weights in host memory.

A model larger than the device keeps the full FFN of every sparsified layer
in host memory (`pinned_host`); everything else stays in device memory. The
compiled prefill copies each layer's FFN into device memory as that layer
runs (`use_layer`: a per-layer transfer inside the one compiled pass, which
XLA may overlap with the previous layer's work, and whose buffer is dead once
the layer is done); the gather copies the layer's FFN in and keeps only the
core rows (`HostFFNGather`), so the compact FFNs, and every weight the decode
step reads, are in device memory.
"""

from __future__ import annotations

from typing import Dict, Optional

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from coreinfer_jax.checkpoint.convert import random_params
from coreinfer_jax.core import cost

from coreinfer_jax.core.gather import CoreGather
from coreinfer_jax.core.spec import CoreSpec
from coreinfer_jax.model.cache import init_cache
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.ffn import FFNParams
from coreinfer_jax.model.params import LayerParams, ModelParams

HOST = "pinned_host"


def check_offload(offload_ffn: bool, sparse: bool, tp: int) -> None:
  """Refuses, in one line, an offload that cannot run: dense decoding reads
  every FFN weight each step; a mesh is not supported yet."""
  if offload_ffn and not sparse:
    raise ValueError("--offload_ffn needs a sparse method: dense decoding reads every FFN "
                     "weight at each step")
  if offload_ffn and tp > 1:
    raise ValueError("--offload_ffn on a device mesh (--tp > 1) is not built yet")


def offload_ffns(params: ModelParams, spec: CoreSpec) -> ModelParams:
  """`params` with the FFN of every sparsified layer (k not None) moved to
  host memory of the device that holds it."""
  def to_host(ffn: FFNParams) -> FFNParams:
    return jax.tree_util.tree_map(
        lambda a: jax.device_put(a, SingleDeviceSharding(next(iter(a.devices())), memory_kind=HOST)),
        ffn)
  return params.with_ffns(tuple(to_host(layer.ffn) if k is not None else layer.ffn
                                for layer, k in zip(params.layers, spec.layer_k)))


def to_device(_: int, layer: LayerParams) -> LayerParams:
  """A `use_layer` (inside a compiled function): the layer's FFN in device memory."""
  return layer.replace(ffn=jax.device_put(layer.ffn, jax.memory.Space.Device))


class HostFFNGather(CoreGather):
  """`CoreGather` from host-resident FFNs: each layer's weights copied into
  device memory, its core rows kept there."""

  def layer(self, ffn: FFNParams, core: jax.Array):
    return super().layer(jax.device_put(ffn, jax.memory.Space.Device), core)


def memory_record(params: ModelParams, decode_params: ModelParams) -> Dict[str, int]:
  """Weight bytes per device by memory, from the arrays' memory kinds:
  what the decode step reads from device memory; the peak in device memory
  (the resident weights and the compact FFNs, plus one host-resident layer's
  FFN, which the prefill and the gather copy in one layer at a time); and
  what stays in host memory."""
  one_layer = max((cost.bytes_in_memory(HOST, layer.ffn) for layer in params.layers), default=0)
  return {"device_weight_bytes_decode": cost.bytes_in_memory("device", decode_params),
          "device_weight_bytes_peak": cost.bytes_in_memory("device", params, decode_params)
                                      + one_layer,
          "host_weight_bytes": cost.bytes_in_memory(HOST, params)}


def planned_memory(config: ModelConfig, spec: Optional[CoreSpec], dtype, offload_ffn: bool,
                   batch: int, cache_len: int) -> Dict[str, int]:
  """Before anything loads, from shapes alone (`jax.eval_shape`): the device
  bytes at peak that `memory_record` will report (`weights`), and the KV
  cache's (`cache`)."""
  params = jax.eval_shape(lambda: random_params(config, 0, dtype))
  sparse = [] if spec is None else [i for i, k in enumerate(spec.layer_k) if k is not None]
  gather = CoreGather(shared=spec is not None and spec.shared)
  compact = sum(cost.param_bytes(jax.eval_shape(
      gather.layer, params.layers[i].ffn,
      jax.ShapeDtypeStruct((1 if gather.shared else batch, spec.layer_k[i]), jnp.int32)))
      for i in sparse)
  ffn = [cost.param_bytes(params.layers[i].ffn) for i in sparse]
  host = sum(ffn) - max(ffn, default=0) if offload_ffn else 0   # one layer is copied in at a time
  cache = jax.eval_shape(lambda: init_cache(config, batch, cache_len, jnp.zeros((batch,), jnp.int32),
                                            dtype))
  return {"weights": cost.param_bytes(params) + compact - host,
          "cache": cost.param_bytes((cache.k, cache.v))}


def check_fits(limit_gb: Optional[float], planned: Dict[str, int], offload_ffn: bool) -> None:
  """Refuses, in one line, a run whose planned device memory exceeds `limit_gb`."""
  if limit_gb is None:
    return
  need = planned["weights"] + planned["cache"]
  if need > limit_gb * 1e9:
    hint = "" if offload_ffn else "; --offload_ffn keeps the sparsified layers' FFNs in host memory"
    raise ValueError(f"--device_memory_limit_gb={limit_gb:g}: the run needs {need / 1e9:.3f} GB "
                     f"of device memory ({planned['weights'] / 1e9:.3f} GB of weights at peak, "
                     f"{planned['cache'] / 1e9:.3f} GB of KV cache){hint}")
