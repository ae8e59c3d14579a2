"""Memory-limit mode: the sparsified layers' FFN weights in host memory.

A model larger than the device keeps the full FFN of every sparsified layer
in host memory (`pinned_host`); everything else stays in device memory. The
compiled prefill copies each layer's FFN into device memory as that layer
runs (`use_layer`: a per-layer transfer inside the one compiled pass, which
XLA may overlap with the previous layer's work, and whose buffer is dead once
the layer is done). The gather (`HostFFNGather`) then keeps only the core
rows, in one of two ways: `device` copies the layer's FFN in and gathers
there (on a mesh, each device its own block); `host` gathers on the host
(`compute_on("device_host")`) and copies only the k rows. Either way the
compact FFNs, and every weight the decode step reads, are in device memory.
"""

from __future__ import annotations

from typing import Dict, Optional

import jax
import jax.numpy as jnp
from jax.experimental.compute_on import compute_on
from jax.sharding import Mesh

from coreinfer_jax.checkpoint.convert import random_params
from coreinfer_jax.core import cost

from coreinfer_jax.core.gather import CoreGather
from coreinfer_jax.core.spec import CoreSpec
from coreinfer_jax.model.cache import init_cache
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.ffn import FFNParams
from coreinfer_jax.model.params import LayerParams, ModelParams
from coreinfer_jax.runtime import mesh as meshes
from coreinfer_jax.runtime.core_placement import MeshCoreGather

HOST = "pinned_host"
GATHER_SIDES = ("device", "host")   # where `HostFFNGather` picks the core rows


def check_offload(offload_ffn: bool, sparse: bool, tp: int, gather_on: str = "device") -> None:
  """Refuses, in one line, an offload that cannot run: dense decoding reads
  every FFN weight each step; the host-side gather runs on one device."""
  if gather_on not in GATHER_SIDES:
    raise ValueError(f"--offload_gather must be one of {', '.join(GATHER_SIDES)}, got {gather_on!r}")
  if offload_ffn and not sparse:
    raise ValueError("--offload_ffn needs a sparse method: dense decoding reads every FFN "
                     "weight at each step")
  if offload_ffn and tp > 1 and gather_on == "host":
    raise ValueError("--offload_gather=host runs on one device; on a mesh (--tp > 1) each device "
                     "copies its FFN block in (--offload_gather=device)")


def offload_ffns(params: ModelParams, spec: CoreSpec) -> ModelParams:
  """`params` with the FFN of every sparsified layer (k not None) moved to
  host memory, each shard to its own device's host memory (placement kept)."""
  def to_host(ffn: FFNParams) -> FFNParams:
    return jax.tree_util.tree_map(
        lambda a: jax.device_put(a, a.sharding.with_memory_kind(HOST)), ffn)
  return params.with_ffns(tuple(to_host(layer.ffn) if k is not None else layer.ffn
                                for layer, k in zip(params.layers, spec.layer_k)))


def to_device(_: int, layer: LayerParams) -> LayerParams:
  """A `use_layer` (inside a compiled function): the layer's FFN in device memory."""
  return layer.replace(ffn=jax.device_put(layer.ffn, jax.memory.Space.Device))


class HostFFNGather(CoreGather):
  """A `CoreGather` (`inner`: one device's, or a mesh's) from host-resident
  FFNs, into device memory. `gather_on="device"`: each layer's FFN copied
  into device memory, `inner` gathering there (the whole layer crosses to the
  device); `"host"` (one device): the core rows picked on the host, only they
  copied (k/F of the layer crosses, but the host does the gather)."""

  def __init__(self, inner: CoreGather, gather_on: str = "device"):
    super().__init__(inner.shared, index_mode="clip")
    self.inner = inner
    self.gather_on = gather_on

  def layer(self, ffn: FFNParams, core: jax.Array):
    if self.gather_on == "device":
      return self.inner.layer(jax.device_put(ffn, jax.memory.Space.Device), core)
    core = jax.device_put(core, jax.memory.Space.Host)
    with compute_on("device_host"):
      compact = super().layer(ffn, core)
    return jax.device_put(compact, jax.memory.Space.Device)

  def shardings(self, shapes):
    return self.inner.shardings(shapes)

  def buffers(self, shapes):
    return self.inner.buffers(shapes)


def memory_record(params: ModelParams, decode_params: ModelParams,
                  gather_on: str = "device") -> Dict[str, int]:
  """Weight bytes per device by memory, from the arrays' memory kinds and shardings:
  what the decode step reads from device memory; the peak in device memory
  (the resident weights and the compact FFNs, plus one host-resident layer's
  FFN, which the prefill and the gather copy in one layer at a time); what
  stays in host memory; and what crosses from host to device memory for one
  prompt (batch): the prefill copies every host-resident FFN once, the gather
  copies them again (`gather_on="device"`) or only their core rows (`"host"`)."""
  layer_host = [cost.bytes_in_memory(HOST, layer.ffn) for layer in params.layers]
  host = cost.bytes_in_memory(HOST, params)
  core_rows = cost.bytes_in_memory("device", [decode.ffn for decode, on_host in
                                              zip(decode_params.layers, layer_host) if on_host])
  return {"device_weight_bytes_decode": cost.bytes_in_memory("device", decode_params),
          "device_weight_bytes_peak": cost.bytes_in_memory("device", params, decode_params)
                                      + max(layer_host, default=0),
          "host_weight_bytes": host,
          "host_to_device_bytes_per_prompt": host + (host if gather_on == "device" else core_rows)}


def _shards(shapes, shardings):
  """One device's shard of each of `shapes` (all of it without `shardings`)."""
  if shardings is None:
    return shapes
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(s.shard_shape(a.shape), a.dtype), shapes, shardings)


def planned_memory(config: ModelConfig, spec: Optional[CoreSpec], dtype, offload_ffn: bool,
                   batch: int, cache_len: int, mesh: Optional[Mesh] = None) -> Dict[str, int]:
  """Before anything loads, from shapes alone (`jax.eval_shape`), per device
  (on a `mesh`, from the shardings the run will use): the device bytes at
  peak that `memory_record` will report (`weights`), and the KV cache's
  (`cache`)."""
  shapes = jax.eval_shape(lambda: random_params(config, 0, dtype))
  params = _shards(shapes, None if mesh is None else meshes.param_shardings(shapes, config, mesh))
  sparse = [] if spec is None else [i for i, k in enumerate(spec.layer_k) if k is not None]
  gather = (CoreGather(shared=spec is not None and spec.shared) if mesh is None or spec is None
            else MeshCoreGather(mesh, spec))
  rows = 1 if gather.shared else batch
  compact = jax.eval_shape(lambda ffns: tuple(
      gather.layer(ffn, jnp.zeros((rows, spec.layer_k[i]), jnp.int32))
      for i, ffn in zip(sparse, ffns)), [shapes.layers[i].ffn for i in sparse])
  compact = _shards(compact, gather.shardings(compact))
  ffn = [cost.param_bytes(params.layers[i].ffn) for i in sparse]
  host = sum(ffn) - max(ffn, default=0) if offload_ffn else 0   # one layer is copied in at a time
  cache = jax.eval_shape(lambda: init_cache(config, batch, cache_len, jnp.zeros((batch,), jnp.int32),
                                            dtype))
  cache = _shards(cache, None if mesh is None else meshes.cache_shardings(cache, mesh))
  return {"weights": cost.param_bytes(params) + cost.param_bytes(compact) - host,
          "cache": cost.param_bytes((cache.k, cache.v))}


def check_fits(limit_gb: Optional[float], planned: Dict[str, int], offload_ffn: bool) -> None:
  """Refuses, in one line, a run whose planned device memory exceeds `limit_gb`."""
  if limit_gb is None:
    return
  need = planned["weights"] + planned["cache"]
  if need > limit_gb * 1e9:
    hint = "" if offload_ffn else "; --offload_ffn keeps the sparsified layers' FFNs in host memory"
    raise ValueError(f"--device_memory_limit_gb={limit_gb:g}: the run needs {need / 1e9:.3g} GB "
                     f"of device memory ({planned['weights'] / 1e9:.3g} GB of weights at peak, "
                     f"{planned['cache'] / 1e9:.3g} GB of KV cache){hint}")
