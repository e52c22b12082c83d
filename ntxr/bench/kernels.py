"""The loss-kernel table: each strategy's compiled loss against the per-anchor loop.

For each strategy and shape (N pairs, T frames, W words, E dims) it times, warm-up
excluded:
  kernel  the compiled forward+backward of `ntxr.sampling.triplet_loss`;
  loop    the same loss computed as the authors' PyTorch code does
          (`ntxr.bench.reference`), differentiated eagerly in JAX, and in PyTorch
          with torch_loop; skipped above loop_max_n;
  matmul  one plain matrix product with the kernel's FLOPs, so `matmul frac` is
          the share of plain-matmul throughput the kernel reaches.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ntxr import sampling
from ntxr.bench import reference, timing


def kernel_flops(strategy: str, n: int, t: int, w: int, e: int) -> float:
  """Matmul FLOPs of one forward+backward of `sampling.triplet_loss`: the selection
  matrix (no gradient), then the chosen pairs forward and their two gradient products."""
  pair = 2.0 * t * w * e
  needs = sampling.get_strategy(strategy).needs
  if strategy == "full_batch":  # every pair, with gradient
    return 3 * n * n * pair
  selected = 9 * n * pair  # 3N pairs, forward and two products backward
  if needs == "cross":
    return n * n * pair + selected
  if needs in ("audio", "text"):  # the upper triangle of a symmetric matrix
    length = t if needs == "audio" else w
    return n * (n + 1) / 2 * 2.0 * length * length * e + selected
  return selected


def torch_loop_seconds(audio, text, audio_ids, strategy: str, repeats: int) -> float:
  """Median seconds of the loop's forward+backward in PyTorch (`timing.torch_device`)."""
  import torch  # pylint: disable=import-outside-toplevel
  ops, rng, device = reference.torch_ops(), np.random.default_rng(0), timing.torch_device()
  leaves = [torch.tensor(np.asarray(x, np.float32), device=device, requires_grad=True)
            for x in (audio, text)]
  def step():
    loss = reference.per_anchor_loss(ops, *leaves, audio_ids, strategy, 0.5, rng)[0]
    loss.backward()
    timing.torch_synchronize(device)
  return timing.time_call(step, repeats=repeats)


def bench_loss(strategy: str, shape: tuple, dtype, repeats: int, loop_max_n: int,
               torch_loop: bool) -> dict:
  """One row of the table."""
  n, t, w, e = shape
  audio, text, audio_ids = timing.embeddings(n, t, w, e, dtype)
  ids = jnp.asarray(audio_ids)
  kernel = jax.jit(jax.value_and_grad(
      lambda a, x, key: sampling.triplet_loss(a, x, ids, strategy=strategy, key=key),
      argnums=(0, 1)))
  kernel_s = timing.time_call(kernel, audio, text, jax.random.PRNGKey(0), repeats=repeats)
  flops = kernel_flops(strategy, n, t, w, e)
  row = dict(strategy=strategy, N=n, T=t, W=w, E=e, dtype=jnp.dtype(dtype).name,
             kernel_ms=1e3 * kernel_s, gflops=flops / kernel_s / 1e9,
             matmul_fraction=timing.matmul_seconds(flops, e, dtype, repeats) / kernel_s,
             loop_ms=None, speedup=None, torch_loop_ms=None, torch_speedup=None)
  if n > loop_max_n:
    return row
  rng = np.random.default_rng(0)
  loop = jax.value_and_grad(
      lambda a, x: reference.per_anchor_loss(reference.JAX_OPS, a, x, audio_ids, strategy,
                                             0.5, rng)[0], argnums=(0, 1))
  loop_s = timing.time_call(loop, audio, text, repeats=max(1, repeats // 3))
  row.update(loop_ms=1e3 * loop_s, speedup=loop_s / kernel_s)
  if torch_loop:
    torch_s = torch_loop_seconds(audio, text, audio_ids, strategy, max(1, repeats // 3))
    row.update(torch_loop_ms=1e3 * torch_s, torch_speedup=torch_s / kernel_s)
  return row


def run(shapes, strategies, dtype, repeats: int, loop_max_n: int, torch_loop: bool) -> list:
  """One row per shape and strategy, each also printed to stderr as it finishes."""
  rows = []
  for shape in shapes:
    for strategy in strategies:
      rows.append(bench_loss(strategy, shape, dtype, repeats, loop_max_n, torch_loop))
      print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  return rows


def format_table(rows: list) -> str:
  """The rows as a Markdown table."""
  return timing.markdown_table(
      [("strategy", "strategy", ""), *timing.SHAPE_COLUMNS, ("kernel ms", "kernel_ms", ".2f"),
       ("JAX loop ms", "loop_ms", ".1f"), ("speedup", "speedup", ".1f"),
       ("torch loop ms", "torch_loop_ms", ".1f"), ("speedup", "torch_speedup", ".1f"),
       ("GFLOP/s", "gflops", ".1f"), ("matmul frac", "matmul_fraction", ".2f")], rows)
