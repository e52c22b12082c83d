"""Where a loss kernel's time goes: the compiled `ntxr.sampling.triplet_loss` of one
strategy and shape (N pairs, T frames, W words, E dims), beside the work it cannot avoid.

  kernel    forward+backward (the kernels table's figure)
  forward   the loss alone; backward is the difference
  products  the chosen pairs' frame-word products and their ReLU-sum, forward only:
            3N products [T, E] x [E, W], each pair's own (the work of any implementation,
            the authors' loop included)
  one GEMM  the same FLOPs as one 2-D product [3N*T, E] x [E, W] and its ReLU-sum: no
            batching, the same narrow output (W columns per frame)
  matmul    a plain square product with the products' FLOPs
"""

import jax
import jax.numpy as jnp

from ntxr import sampling
from ntxr.bench import timing


def bench_parts(strategy: str, shape: tuple, dtype, repeats: int) -> dict:
  """One row: milliseconds of each part, and the products' GFLOP/s."""
  n, t, w, e = shape
  audio, text, audio_ids = timing.embeddings(n, t, w, e, dtype)
  ids, key = jnp.asarray(audio_ids), jax.random.PRNGKey(0)
  loss = lambda a, x: sampling.triplet_loss(a, x, ids, strategy=strategy, key=key)
  frames, words = jnp.tile(audio, (3, 1, 1)), jnp.tile(text, (3, 1, 1))
  products = lambda a, x: jax.nn.relu(jnp.einsum("nte,nwe->ntw", a, x)).sum(axis=(1, 2))
  one_gemm = lambda a, x: jax.nn.relu(a.reshape(-1, e) @ x[0].T).sum()
  ms = lambda fn, *args: 1e3 * timing.time_call(jax.jit(fn), *args, repeats=repeats)
  flops = 3 * n * 2.0 * t * w * e
  products_ms = ms(products, frames, words)
  return dict(strategy=strategy, N=n, T=t, W=w, E=e, dtype=jnp.dtype(dtype).name,
              kernel_ms=ms(jax.value_and_grad(loss, argnums=(0, 1)), audio, text),
              forward_ms=ms(loss, audio, text), products_ms=products_ms,
              gemm_ms=ms(one_gemm, frames, words),
              matmul_ms=1e3 * timing.matmul_seconds(flops, e, dtype, repeats),
              products_gflops=flops / products_ms / 1e6)


def run(shapes, strategies, dtype, repeats: int) -> list:
  """One row per shape and strategy."""
  return [bench_parts(strategy, shape, dtype, repeats)
          for shape in shapes for strategy in strategies]


def format_table(rows: list) -> str:
  """The rows as a Markdown table."""
  return timing.markdown_table(
      [("strategy", "strategy", ""), *timing.SHAPE_COLUMNS, ("kernel ms", "kernel_ms", ".2f"),
       ("forward ms", "forward_ms", ".2f"), ("products ms", "products_ms", ".2f"),
       ("one GEMM ms", "gemm_ms", ".2f"), ("matmul ms", "matmul_ms", ".2f"),
       ("products GFLOP/s", "products_gflops", ".1f")], rows)
