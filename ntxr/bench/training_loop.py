"""The training loop's overhead: the share of its wall time spent outside the jitted step.

Two loops run the same donated `steps.train_step` over batches the host makes one by one
(random log-mel and tokens, as the input pipeline hands them over):
- "every step": each batch is sent to the device when its step needs it and each step's
  statistics are read back at once (training's loop before it ran asynchronously);
- "every k, prefetched": training's loop, with `parallel.prefetch` and
  `steps.UnreadStatistics` read every k steps.
The step alone is the same step over one batch already on the device, never read back
until the end: what the device needs. The share outside = 1 - steps x step alone / wall.
The three alternate, round after round, so that a machine whose speed drifts (a shared
CPU) drifts for all three.
"""

import statistics
import time

import jax

from ntxr import parallel, steps
from ntxr.bench import timing, training_steps

LOOPS = {"every step": dict(read_every=1, prefetch=1),
         "every 10, prefetched": dict(read_every=10, prefetch=2)}


def loop_seconds(step, state, make_batch, count: int, *, read_every: int,
                 prefetch: int) -> tuple:
  """(seconds, state) of `count` steps over make_batch(i), putting batches `prefetch`
  ahead and reading the statistics every `read_every` steps."""
  unread = steps.UnreadStatistics()
  start = time.perf_counter()
  batches = parallel.prefetch((make_batch(i) for i in range(count)), jax.device_put, prefetch)
  for i, batch in enumerate(batches):
    state, statistics = step(state, batch, jax.random.PRNGKey(i))
    unread.add(i, statistics)
    if len(unread) == read_every:
      unread.read()
  unread.read()
  jax.block_until_ready(state)
  return time.perf_counter() - start, state


def run(widths: dict, batch_sizes, count: int, shape: dict, repeats: int = 3,
        dtype: str = "float32") -> list:
  """One row per CRNN width, batch size and loop: milliseconds per step in the loop and
  alone, and the share of the loop's time outside the step; each the median of
  `repeats` rounds that run the step alone and each loop in turn."""
  rows = []
  for name, channels in widths.items():
    for n in batch_sizes:
      step, state, resident = training_steps.jax_step(channels, n, shape, dtype)
      make_batch = lambda i, n=n: training_steps.random_batch(n, **shape)
      _, state = loop_seconds(step, state, make_batch, 2, read_every=1, prefetch=1)  # compile
      seconds = {loop: [] for loop in ("alone", *LOOPS)}
      for _ in range(repeats):
        took, state = loop_seconds(step, state, lambda i: resident, count, read_every=count,
                                   prefetch=1)
        seconds["alone"].append(took)
        for loop, settings in LOOPS.items():
          took, state = loop_seconds(step, state, make_batch, count, **settings)
          seconds[loop].append(took)
      alone = statistics.median(seconds["alone"])
      for loop, settings in LOOPS.items():
        took = statistics.median(seconds[loop])
        rows.append(dict(width=name, n=n, dtype=dtype, **shape, loop=loop, **settings,
                         steps=count, repeats=repeats, loop_ms=1e3 * took / count,
                         alone_ms=1e3 * alone / count, outside_share=1 - alone / took))
  return rows


def format_table(rows: list) -> str:
  """The rows as a Markdown table."""
  return timing.markdown_table(
      [("CRNN width", "width", ""), ("N", "n", ""), ("frames", "frames", ""),
       ("statistics read", "loop", ""), ("ms per step in the loop", "loop_ms", ".1f"),
       ("ms per step alone", "alone_ms", ".1f"),
       ("share outside the step", "outside_share", ".2f")], rows)
