"""The score-matrix table: the training-time cross and symmetric audio-audio alignment
matrices, and the evaluation's all-pairs scores over clips and captions of varied
lengths; their tiling (`scores.TILINGS`, the backend's), time, share of plain-matmul
throughput (of the useful FLOPs: valid frames and words only) and the scratch memory XLA
allots."""

import jax
import jax.numpy as jnp
import numpy as np

from ntxr import evaluate, scores
from ntxr.bench import timing


def _evaluation_call(n: int, t: int, w: int, e: int):
  """evaluate.score_matrix on n clips of t/2 to t frames x 5n captions of 2w/5 to w
  words (seeded), and its useful FLOPs."""
  rng = np.random.default_rng(0)
  frames, words = rng.integers(t // 2, t + 1, n), rng.integers(2 * w // 5, w + 1, 5 * n)
  audio, text, _ = timing.embeddings(n, t, w, e, jnp.float32)
  text = np.tile(np.asarray(text), (5, 1, 1))
  audio_mask = np.arange(t)[None] < frames[:, None]
  text_mask = np.arange(w)[None] < words[:, None]
  call = lambda: evaluate.score_matrix(np.asarray(audio), audio_mask, text, text_mask)
  return call, 2.0 * frames.sum() * words.sum() * e


def bench_scores(kind: str, shape: tuple, dtype, repeats: int) -> dict:
  """One row: kind "cross", "audio-audio" or "evaluation", shape (N, T, W, E)."""
  n, t, w, e = shape
  audio, text, _ = timing.embeddings(n, t, w, e, dtype)
  scratch_mib = None
  if kind == "evaluation":  # host-driven blocks: time the whole call
    call, flops = _evaluation_call(n, t, w, e)
    seconds = timing.time_call(call, repeats=repeats)
  else:
    if kind == "cross":
      fn, args, flops = scores.alignment_scores, (audio, text), 2.0 * n * n * t * w * e
    else:
      fn, args, flops = scores.symmetric_alignment_scores, (audio,), n * (n + 1.0) * t * t * e
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = timing.time_call(compiled, *args, repeats=repeats)
    scratch_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
  stats = jax.devices()[0].memory_stats() or {}
  return dict(kind=kind, N=n, T=t, W=w, E=e, dtype=jnp.dtype(dtype).name,
              tiling=scores.tiling_for(None),
              ms=1e3 * seconds, gflops=flops / seconds / 1e9,
              matmul_fraction=timing.matmul_seconds(flops, e, dtype, repeats) / seconds,
              scratch_mib=scratch_mib,
              device_peak_mib=stats.get("peak_bytes_in_use", 0) / 2**20 or None)


def run(grid: list, dtype, repeats: int) -> list:
  """One row per (kind, N, T, W, E) of the grid."""
  return [bench_scores(kind, shape, dtype, repeats) for kind, *shape in grid]


def format_table(rows: list) -> str:
  """The rows as a Markdown table."""
  return timing.markdown_table(
      [("scores", "kind", ""), *timing.SHAPE_COLUMNS, ("tiling", lambda row: row.get("tiling"), ""),
       ("ms", "ms", ".1f"),
       ("GFLOP/s", "gflops", ".1f"), ("matmul frac", "matmul_fraction", ".2f"),
       ("XLA scratch MiB", "scratch_mib", ".0f"), ("device peak MiB", "device_peak_mib", ".0f")],
      rows)
