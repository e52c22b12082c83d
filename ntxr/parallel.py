"""Data parallelism over every device of every process: one mesh axis, "data" (and for
runs stepped together, "runs" and "data": `RunsAndData`).

The global batch is split by rows over the devices and the train state is replicated.
Under `jax.jit` the in-batch score matrices are still computed over the global batch
(XLA gathers the other devices' embeddings where a matrix needs them), so negatives
come from the whole global batch, exactly as on one device: the point of scale for
negative sampling.

Several hosts: call `initialize` before anything touches a device. Every process then
reads the same global batches (same seed, same length buckets, hence the same padded
shapes) and hands over only its own rows.
"""

import collections
import math
from typing import Callable, Iterable, Iterator, Optional, Sequence

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec
import numpy as np

from ntxr import settings


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, heartbeat_timeout_seconds: int = 100) -> None:
  """jax.distributed.initialize; with no arguments it finds a Cloud TPU slice's or a
  SLURM job's processes by itself. A process silent for heartbeat_timeout_seconds
  (killed, say) ends the others with an error rather than leaving them waiting."""
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_seconds)


class Devices:
  """A one-axis ("data") mesh over `devices` (default: every device of every process)."""

  def __init__(self, devices: Optional[Sequence[jax.Device]] = None):
    devices = list(devices or jax.devices())
    self.mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,),
                              devices=devices)
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.rows = NamedSharding(self.mesh, PartitionSpec("data"))

  @property
  def count(self) -> int:
    return self.mesh.size

  def check_divides(self, name: str, size: int) -> None:
    """Raises settings.SettingError unless `size` splits evenly over the devices."""
    if size % self.count:
      raise settings.SettingError(f"{name} {size} does not split over {self.count} devices: "
                                  f"make it a multiple of {self.count}")

  def replicate(self, tree):
    """A copy of every leaf on every device."""
    return jax.device_put(tree, self.replicated)

  def shard(self, batch):
    """A global batch (a tree of [B, ...] arrays, the same in every process) as global
    arrays split by rows over the devices; each process hands over only its rows."""
    processes, index = jax.process_count(), jax.process_index()
    def split(x):
      x = np.asarray(x)
      rows = x.shape[0] // processes
      return jax.make_array_from_process_local_data(
          self.rows, x[index * rows:(index + 1) * rows], x.shape)
    return jax.tree.map(split, batch)

  def jit(self, fn, *, donate_argnums=()):
    """jit of fn(state, batch, key): state and key replicated, batch split by rows, all
    outputs replicated."""
    return jax.jit(fn, in_shardings=(self.replicated, self.rows, self.replicated),
                   out_shardings=self.replicated, donate_argnums=donate_argnums)


class RunsAndData:
  """A two-axis ("runs", "data") mesh over `devices` (default: all of this process's) for
  `runs` runs stepped together (`ntxr.together`): the runs spread over as many groups of
  devices as divide both the run count and the device count, and each run's batch is
  split by rows over its group's devices (negatives still come from the run's whole
  batch, as on one device). One process only."""

  def __init__(self, runs: int, devices: Optional[Sequence[jax.Device]] = None):
    devices = list(devices or jax.local_devices())
    groups = math.gcd(runs, len(devices))
    self.mesh = jax.make_mesh((groups, len(devices) // groups), ("runs", "data"),
                              axis_types=(AxisType.Auto,) * 2, devices=devices)
    self.runs = NamedSharding(self.mesh, PartitionSpec("runs"))
    self.rows = NamedSharding(self.mesh, PartitionSpec("runs", "data"))

  def jit(self, fn, *, donate_argnums=()):
    """jit of fn(states [R], batches [R, B, ...], keys [R]): states, keys and every output
    split over "runs", batches over "runs" and then by rows over "data"."""
    return jax.jit(fn, in_shardings=(self.runs, self.rows, self.runs),
                   out_shardings=self.runs, donate_argnums=donate_argnums)


def prefetch(batches: Iterable, put: Callable, size: int = 2) -> Iterator:
  """Yields put(batch) for each batch, `size - 1` batches ahead: the next batch is read
  and sent to the devices while the step on the current one runs (jit dispatches
  asynchronously). size 1 puts each batch only when it is needed."""
  if size < 1:
    raise ValueError(f"prefetch size must be at least 1, not {size}")
  ahead = collections.deque()
  for batch in batches:
    ahead.append(put(batch))
    if len(ahead) == size:
      yield ahead.popleft()
  while ahead:
    yield ahead.popleft()


def device_memory(device: jax.Device) -> Optional[int]:
  """The bytes `device` can hold (its allocator's limit: by default 75% of a GPU's), or
  None where JAX does not say (the CPU)."""
  return (device.memory_stats() or {}).get("bytes_limit")
