"""The runs-together table: R runs' training steps as one vmapped program
(`ntxr.together.train_step`) against R separate steps (`ntxr.steps.train_step`), per CRNN
width; each run its own parameters, keys and batch of n, as an ablation's runs have."""

import functools

import jax

from ntxr import models, settings, steps, together
from ntxr.bench import SHAPE, timing, training_steps


def together_seconds(channels: tuple, runs: int, n: int, shape: dict, repeats: int,
                     dtype: str = "float32") -> float:
  """Median seconds of one jitted together.train_step of `runs` runs (states donated)."""
  model = models.DualEncoder(vocab_size=shape["vocab"], channels=channels, dtype=dtype)
  states = together.stack([steps.create_train_state(
      model, jax.random.key(r), frames=shape["frames"], words=shape["words"],
      mel_bands=shape["mel_bands"]) for r in range(runs)])
  batches = jax.device_put(together.stack([training_steps.random_batch(n, **shape)] * runs))
  keys = jax.random.split(jax.random.key(1), runs)
  step = jax.jit(functools.partial(together.train_step, loss=settings.Loss()),
                 donate_argnums=0)
  def one_step():  # the states are donated: each call steps from the last one's
    nonlocal states
    states, statistics = step(states, batches, keys)
    return statistics
  return timing.time_call(one_step, repeats=repeats)


def run(widths: dict, run_counts, n: int, repeats: int, shape: dict = None,
        dtype: str = "float32") -> list:
  """One row per CRNN width and number of runs: one run's step, R runs together, and
  the ratio of R separate steps' time to theirs (how much faster the ablation trains)."""
  shape = shape or SHAPE
  rows = []
  for name, channels in widths.items():
    alone_ms = 1e3 * training_steps.jax_seconds(channels, n, shape, repeats, dtype)
    for runs in run_counts:
      together_ms = 1e3 * together_seconds(channels, runs, n, shape, repeats, dtype)
      rows.append(dict(width=name, channels=list(channels), n=n, dtype=dtype, **shape,
                       runs=runs, alone_ms=alone_ms, together_ms=together_ms,
                       of_one=together_ms / alone_ms,
                       speedup=runs * alone_ms / together_ms))
  return rows


def format_table(rows: list) -> str:
  """The rows as a Markdown table."""
  return timing.markdown_table(
      [("CRNN width", "width", ""), ("N", "n", ""), ("frames", "frames", ""),
       ("runs", "runs", ""), ("one run's step ms", "alone_ms", ".0f"),
       ("runs together ms", "together_ms", ".0f"), ("x one step", "of_one", ".2f"),
       ("throughput x", "speedup", ".2f")], rows)
