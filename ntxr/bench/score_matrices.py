"""The score-matrix table: the cross and the symmetric audio-audio alignment matrices
alone, their time, share of plain-matmul throughput and the scratch memory XLA allots."""

import jax
import jax.numpy as jnp

from ntxr import scores
from ntxr.bench import timing


def bench_scores(kind: str, shape: tuple, dtype, repeats: int) -> dict:
  """One row: kind "cross" or "audio-audio", shape (N, T, W, E)."""
  n, t, w, e = shape
  audio, text, _ = timing.embeddings(n, t, w, e, dtype)
  if kind == "cross":
    fn, args, flops = scores.alignment_scores, (audio, text), 2.0 * n * n * t * w * e
  else:
    fn, args, flops = scores.symmetric_alignment_scores, (audio,), n * (n + 1.0) * t * t * e
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = timing.time_call(compiled, *args, repeats=repeats)
  stats = jax.devices()[0].memory_stats() or {}
  return dict(kind=kind, N=n, T=t, W=w, E=e, dtype=jnp.dtype(dtype).name,
              ms=1e3 * seconds, gflops=flops / seconds / 1e9,
              matmul_fraction=timing.matmul_seconds(flops, e, dtype, repeats) / seconds,
              scratch_mib=compiled.memory_analysis().temp_size_in_bytes / 2**20,
              device_peak_mib=stats.get("peak_bytes_in_use", 0) / 2**20 or None)


def run(grid: list, dtype, repeats: int) -> list:
  """One row per (kind, N, T, W, E) of the grid."""
  return [bench_scores(kind, shape, dtype, repeats) for kind, *shape in grid]


def format_table(rows: list) -> str:
  """The rows as a Markdown table."""
  lines = ["| scores | N | T | W | E | ms | GFLOP/s | matmul frac | XLA scratch MiB |"
           " device peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['kind']} | {r['N']} | {r['T']} | {r['W']} | {r['E']} | {r['ms']:.1f} | "
        f"{r['gflops']:.1f} | {r['matmul_fraction']:.2f} | {r['scratch_mib']:.0f} | "
        f"{timing.cell(r['device_peak_mib'], '.0f')} |")
  return "\n".join(lines)
