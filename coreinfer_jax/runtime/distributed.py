"""Several hosts: one JAX process per host, started by `jax.distributed`.

Each process runs the same program over the same inputs; the mesh
(`runtime.mesh.make_mesh`) then spans every process's devices, the weights
are placed by their logical axes as on one host, and what the host reads
(tokens, core sets) is replicated on every process. `start` must run before
anything asks JAX for its devices. On CPU the collectives between processes
are gloo's.
"""

from __future__ import annotations

import os
from typing import Optional

import jax


def wanted(coordinator_address: Optional[str], num_processes: Optional[int],
           process_id: Optional[int]) -> bool:
  """Whether the flags, or the environment JAX reads, ask for several processes."""
  return (coordinator_address is not None or num_processes is not None or process_id is not None
          or "JAX_COORDINATOR_ADDRESS" in os.environ)


def check(coordinator_address: Optional[str], num_processes: Optional[int],
          process_id: Optional[int]) -> None:
  """Refuses, in one line, process settings that cannot start."""
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes must be at least 1, got {num_processes}")
  if process_id is not None and (process_id < 0 or (num_processes is not None
                                                    and process_id >= num_processes)):
    raise ValueError(f"--process_id={process_id} is not in 0..{(num_processes or 1) - 1}")
  if coordinator_address is not None and ":" not in coordinator_address:
    raise ValueError(f"--coordinator_address={coordinator_address!r}: expected HOST:PORT")


def start(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
          process_id: Optional[int] = None) -> bool:
  """Joins the processes when `wanted` (what is not given, JAX finds in its
  environment: JAX_COORDINATOR_ADDRESS, SLURM, Open MPI, ...); True if it did."""
  if not wanted(coordinator_address, num_processes, process_id):
    return False
  check(coordinator_address, num_processes, process_id)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True


def is_leader() -> bool:
  """The process that prints and writes results (the others compute alike)."""
  return jax.process_index() == 0
