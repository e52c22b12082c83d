"""The negatives table: one training step (`ntxr.steps.train_step`, the CRNN and word
encoder, a strategy's triplet loss, Adam) with the global batch split over every device,
its score matrices over the whole batch (`gather`) or its anchors' rows passed round the
ring (`ring`, `ntxr.ring`), and beside them the program one device runs on its share of
the batch alone ("local": what ring aims to stay near). Memory is XLA's analysis of each
compiled program, per device: its temporary buffers, its arguments (the replicated train
state, the device's rows of the batch) and its outputs. Steps are timed where the global
batch is at most `timed_up_to`, and compiled only above it.
"""

import functools
from typing import Optional

import jax
from jax.sharding import NamedSharding, PartitionSpec

from ntxr import models, parallel, settings, steps
from ntxr.bench import timing, training_steps

WAYS = ("gather", "ring", "local")


def _compiled(way: str, strategy: str, batch: int, channels: tuple, shape: dict):
  """(the compiled step, its state, its batch's shape and sharding) of `way` on the
  global batch `batch` (local: batch / devices on the first device alone)."""
  devices = jax.devices()
  if way == "local":
    devices, batch = devices[:1], batch // len(devices)
  mesh = parallel.Devices(devices)
  model = models.DualEncoder(vocab_size=shape["vocab"], channels=channels)
  state = mesh.replicate(steps.create_train_state(
      model, jax.random.key(0), frames=shape["frames"], words=shape["words"],
      mel_bands=shape["mel_bands"]))
  loss = settings.Loss(strategy=strategy, negatives="ring" if way == "ring" else "gather")
  step = mesh.jit(functools.partial(steps.train_step, loss=loss, mesh=mesh.mesh),
                  donate_argnums=0)
  example = training_steps.random_batch(batch, **shape)
  rows = NamedSharding(mesh.mesh, PartitionSpec("data"))
  abstract = {name: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=rows)
              for name, value in example.items()}
  return step.lower(state, abstract, jax.random.key(1)).compile(), state, mesh, example


def measure(way: str, strategy: str, batch: int, channels: tuple, shape: dict,
            repeats: int, timed: bool) -> dict:
  """One row: the per-device memory of `way`'s compiled step on the global batch `batch`
  and, if `timed`, its median milliseconds."""
  compiled, state, mesh, example = _compiled(way, strategy, batch, channels, shape)
  memory = compiled.memory_analysis()
  row = dict(way=way, strategy=strategy, batch=batch, devices=jax.device_count(),
             local_batch=batch // jax.device_count(), frames=shape["frames"],
             words=shape["words"], channels=list(channels),
             temp_bytes=memory.temp_size_in_bytes,
             argument_bytes=memory.argument_size_in_bytes,
             output_bytes=memory.output_size_in_bytes - memory.alias_size_in_bytes, ms=None)
  if timed:
    data = mesh.shard(example)
    def one_step():  # the state is donated: each call steps from the last one's
      nonlocal state
      state, statistics = compiled(state, data, jax.random.key(1))
      return statistics.loss
    row["ms"] = 1e3 * timing.time_call(one_step, repeats=repeats)
  return row


def run(batches, strategies, channels: tuple, shape: dict, repeats: int,
        timed_up_to: int) -> list:
  """Rows of every way, strategy and global batch (each a multiple of the devices);
  ValueError on one device, where there is nothing to split."""
  if jax.device_count() < 2:
    raise ValueError(f"the negatives job splits a batch over several devices; JAX sees "
                     f"one ({jax.devices()[0].device_kind})")
  return [measure(way, strategy, batch, channels, shape, repeats, batch <= timed_up_to)
          for strategy in strategies for batch in batches for way in WAYS]


def per_device_mib(row: dict) -> float:
  return (row["temp_bytes"] + row["argument_bytes"] + row["output_bytes"]) / 2 ** 20


def format_table(rows: list) -> str:
  """The rows as a Markdown table, each way's memory beside the local program's."""
  key = lambda row: (row["strategy"], row["batch"], row["frames"])
  local = {key(r): per_device_mib(r) for r in rows if r["way"] == "local"}
  def against_local(row) -> Optional[float]:
    return per_device_mib(row) / local[key(row)]
  return timing.markdown_table(
      [("strategy", "strategy", ""), ("global batch", "batch", ""), ("frames", "frames", ""),
       ("devices", "devices", ""), ("way", "way", ""),
       ("MiB per device", per_device_mib, ".1f"), ("x local", against_local, ".2f"),
       ("step ms", "ms", ".0f")], rows)

