"""What every benchmark job shares: timing a call, the plain-matmul yardstick, inputs."""

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def time_call(fn: Callable, *args, repeats: int) -> float:
  """Median seconds of fn(*args) over `repeats` calls after one warm-up call."""
  jax.block_until_ready(fn(*args))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)


def matmul_seconds(flops: float, e: int, dtype, repeats: int) -> float:
  """Seconds a plain batched [R, E] x [E, R] product takes for `flops` FLOPs: timed on
  at most 8 x 4096 x 4096 outputs (512 MiB in float32) and scaled to `flops`."""
  rows = int(min(4096, max(64, np.sqrt(flops / (2 * e)))))
  batch = max(1, min(8, round(flops / (2 * e * rows * rows))))
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(key_a, (batch, rows, e), dtype)
  b = jax.random.normal(key_b, (batch, e, rows), dtype)
  seconds = time_call(jax.jit(jnp.matmul), a, b, repeats=repeats)
  return seconds * flops / (2.0 * e * rows * rows * batch)


def embeddings(n: int, t: int, w: int, e: int, dtype):
  """Random L2-normalised audio [n, t, e] and text [n, w, e], and Clotho-like clip ids
  [n] (a few clips with several captions)."""
  key_a, key_t = jax.random.split(jax.random.PRNGKey(n * 7 + t))
  normalise = lambda x: (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)
  audio = normalise(jax.random.normal(key_a, (n, t, e)))
  text = normalise(jax.random.normal(key_t, (n, w, e)))
  audio_ids = np.random.default_rng(n).integers(0, 2 * n, size=n).astype(np.int32)
  return audio, text, audio_ids


SHAPE_COLUMNS = [(name, name, "") for name in ("N", "T", "W", "E")]  # of markdown_table


def markdown_table(columns: list, rows: list) -> str:
  """`rows` as a Markdown table. columns: (header, the row's key or a function of the
  row, format spec) each; a None value shows as "-"."""
  value = lambda row, key: key(row) if callable(key) else row[key]
  cell = lambda x, spec: "-" if x is None else format(x, spec)
  lines = ["| " + " | ".join(header for header, _, _ in columns) + " |",
           "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(value(row, key), spec) for _, key, spec in columns) + " |"
            for row in rows]
  return "\n".join(lines)


def device_name() -> str:
  device = jax.devices()[0]
  return f"{device.platform}: {device.device_kind}"


def torch_device():
  """Where the PyTorch references run: PyTorch's GPU if it sees one, else the CPU."""
  import torch  # pylint: disable=import-outside-toplevel
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_synchronize(device) -> None:
  """Waits for PyTorch's queued work on `device` (a GPU runs it asynchronously)."""
  import torch  # pylint: disable=import-outside-toplevel
  if device.type == "cuda":
    torch.cuda.synchronize(device)
