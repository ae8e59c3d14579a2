"""Core neurons on a tensor-parallel mesh: each device gathers its own rows.

With the FFN split by neurons (`runtime.mesh`), device d owns the block of
neurons [d·F/N, (d+1)·F/N). The compact FFN keeps that split: its neuron
axis is sharded the same way, and every device gathers from its own block
only (`shard_map`), so no weight row crosses devices. Two placements:

- `local`: the core set was chosen k/N per block (`CoreSpec.blocks` = N), so
  every device holds exactly k/N rows: balanced, and the gather is a slice.
- `global`: the global top k (`blocks` = 1), each row on the device owning
  it. The number a device owns varies by prompt, and shapes are static, so
  each device holds min(k, F/N) slots: its own rows, then zero rows (index
  past its block), which add nothing. Decoding reads every slot, so the
  imbalance costs bytes; `device_load` reports the real counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from coreinfer_jax.core.gather import CompactFFNs, CoreGather, CoreSets
from coreinfer_jax.core.spec import CoreSpec
from coreinfer_jax.model.ffn import FFNParams
from coreinfer_jax.model.params import logical_axes
from coreinfer_jax.runtime.mesh import TENSOR_PARALLEL_RULES, TP

PLACEMENTS = ("local", "global")


def placement_of(spec: CoreSpec, mesh: Mesh) -> str:
  """`local` when the spec chose its sets per device block, else `global`."""
  if spec.blocks == mesh.shape[TP]:
    return "local"
  if spec.blocks == 1:
    return "global"
  raise ValueError(f"core sets chosen in {spec.blocks} neuron blocks cannot be placed on "
                   f"{mesh.shape[TP]} devices")


def _partition_specs(tree):
  """Each leaf's PartitionSpec from its logical axes (of an FFN's, only the
  neurons are on the mesh)."""
  is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, str) for n in x)   # noqa: E731
  return jax.tree_util.tree_map(
      lambda names: PartitionSpec(*(TENSOR_PARALLEL_RULES.get(n) for n in names)),
      logical_axes(tree), is_leaf=is_names)


class MeshCoreGather(CoreGather):
  """`CoreGather` on a mesh whose axis `tp` splits the FFN neurons."""

  def __init__(self, mesh: Mesh, spec: CoreSpec):
    super().__init__(spec.shared)
    self.mesh = mesh
    self.placement = placement_of(spec, mesh)
    self.devices = mesh.shape[TP]

  def _own_rows(self, core: jax.Array, block: int) -> jax.Array:
    """Inside the shard_map: this device's slots, as indices into its block."""
    d = lax.axis_index(TP)
    if self.placement == "local":
      per_device = core.shape[-1] // self.devices
      return lax.dynamic_slice_in_dim(core, d * per_device, per_device, axis=-1) - d * block
    local = core - d * block
    owned = (local >= 0) & (local < block)
    slots = min(core.shape[-1], block)
    return jnp.sort(jnp.where(owned, local, block), axis=-1)[..., :slots]   # block: a zero row

  def layer(self, ffn: FFNParams, core: jax.Array):
    block = ffn.up_FD.shape[0] // self.devices
    in_specs = (_partition_specs(ffn), PartitionSpec())
    gather = super().layer
    out_specs = _partition_specs(jax.eval_shape(gather, ffn, core))

    def gather_own(ffn_block: FFNParams, core: jax.Array):
      return gather(ffn_block, self._own_rows(core, block))
    return jax.shard_map(gather_own, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(ffn, core)

  def shardings(self, shapes: CompactFFNs):
    """The `NamedSharding`s of the gather's outputs of `shapes`."""
    return jax.tree_util.tree_map(lambda spec: NamedSharding(self.mesh, spec),
                                  _partition_specs(shapes))

  def buffers(self, shapes: CompactFFNs) -> CompactFFNs:
    return jax.jit(lambda: jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes),
                   out_shardings=self.shardings(shapes))()


def rows_per_device(core: np.ndarray, num_neurons: int, devices: int) -> np.ndarray:
  """int [B, devices]: how many of each set's neurons each device owns."""
  owner = np.asarray(core) // (num_neurons // devices)
  return np.stack([np.sum(owner == d, axis=-1) for d in range(devices)], axis=-1)


def device_load(core: CoreSets, num_neurons: int, devices: int) -> float:
  """The busiest device's rows over a balanced share (k/devices), averaged
  over the sparsified layers and the sets (1.0: balanced, as `local` is)."""
  loads = [rows_per_device(c, num_neurons, devices).max(axis=-1) * devices / c.shape[-1]
           for c in core if c is not None]
  return float(np.mean(loads))
