"""JAX's multi-host runtime: joining it, each process's share of the work, host data across processes.

One run is P processes (one per host, or per GPU) that together drive one Mesh over every device
of every process. The host loop splits its work this way:

* **Per process:** the episodes of the global batch whose index falls in the process's `share`
  (its env workers, and its student decode on a replica of the params on its own devices,
  `local_model`), and likewise its share of the eval games.
* **Gathered:** the finished episodes, which `gather` hands to every process in global order,
  so that everything after the rollout (the batch arrays, teacher scoring, the judge, metrics)
  sees the same host data on every process: the jitted programs on the global mesh then run as
  one SPMD program whose inputs agree by construction.
* **One writer:** process 0 (`is_writer`) writes metrics, TensorBoard, transcripts, results and
  exports; orbax coordinates the checkpoint itself over all of them.

Every random draw of an episode is keyed by its global index (never by process), so P processes
with B/P episodes each play exactly the episodes that one process with B plays.
"""

from __future__ import annotations

import functools
import logging
import pickle
import socket
import time
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
               timeout_s: int) -> None:
  """`jax.distributed.initialize`, failing with the coordinator's address instead of aborting.

  None arguments are left to JAX's cluster detection (SLURM, TPU pods, ...). A process other
  than the coordinator first waits up to `timeout_s` for the coordinator's port to accept a
  connection: JAX itself ends the process with a bare DEADLINE_EXCEEDED when it cannot reach it.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes.
  if coordinator_address and process_id:
    wait_for_coordinator(coordinator_address, timeout_s)
  logging.info("Joining the coordinator %s as process %s of %s (timeout %d s).", coordinator_address or "(detected)",
               process_id, num_processes, timeout_s)
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=timeout_s)
  logging.info("Process %d of %d: %d local of %d devices.", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once `address` ("host:port") accepts a TCP connection; TimeoutError naming it otherwise."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"coordinator address {address!r} is not host:port.")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, max(timeout_s, 0.1))):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise TimeoutError(
            f"The coordinator {address} did not answer within {timeout_s:g} s ({e}): start process 0 there first, "
            "or check the address and that the port is open between the hosts.") from None
      time.sleep(0.5)


def is_writer() -> bool:
  """Whether this process writes the run's files (metrics, transcripts, results, exports)."""
  return jax.process_index() == 0


def share(num: int, process: int | None = None, count: int | None = None) -> range:
  """The global indices [0, num) that `process` (default: this one) plays: a contiguous block.

  The first `num % count` processes take one more, so every index is played exactly once.
  """
  process = jax.process_index() if process is None else process
  count = jax.process_count() if count is None else count
  base, extra = divmod(num, count)
  start = process * base + min(process, extra)
  return range(start, start + base + (process < extra))


def gather(local: Sequence[Any]) -> list[Any]:
  """Every process's `local` items (picklable), concatenated in process order, on every process."""
  if jax.process_count() == 1:
    return list(local)
  payload = np.frombuffer(pickle.dumps(list(local)), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([payload.size], np.int64))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: payload.size] = payload
  everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [item for row, size in zip(everyone, sizes) for item in pickle.loads(row[:size].tobytes())]


def agree(value: Any) -> Any:
  """Process 0's `value` (a bool or number) on every process, for a decision read from shared files.

  A file the writer may be appending to can read differently on another process; a branch that
  launches jitted programs must be taken by every process alike, or they deadlock.
  """
  if jax.process_count() == 1:
    return value
  return type(value)(np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value))).item())


def to_host(tree: Any) -> Any:
  """The pytree's arrays as NumPy on every process, gathered where they are spread over processes."""

  def one(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(one, tree)


def local_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
  """The part of `mesh` on this process's devices (the mesh itself with one process)."""
  return mesh if jax.process_count() == 1 else mesh.local_mesh


def local_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
  """`model` with its params replicated onto this process's devices, for work only this process does.

  With one process the model itself. With several, each parameter is all-gathered over the
  global mesh (a collective: every process calls this at the same point) and placed on the
  local mesh with the model's sharding rules, so that a process decodes its episodes with no
  further communication.
  """
  if jax.process_count() == 1:
    return model
  from sage_opd_jax.models import sharding  # pylint: disable=g-import-not-at-top  # models imports this module's users.

  graphdef, state = nnx.split(model)
  full = _replicate(mesh)(state)
  local = jax.tree.map(lambda x: x.addressable_data(0), full)
  mesh_here = local_mesh(mesh)
  return nnx.merge(graphdef, jax.device_put(local, sharding.state_shardings(local, mesh_here)))


@functools.cache
def _replicate(mesh: jax.sharding.Mesh) -> Any:
  """The jitted all-gather of a pytree onto every device of `mesh`: one per mesh, so that the
  per-update `local_model` traces and compiles it once, not at every call."""
  return jax.jit(lambda tree: tree, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
