"""The union table: one strategy ablation's runs stepped as one program over the union of
its strategies against one program per strategy (as `ntxr.programs` groups them).
In the union program each run's negatives are chosen by `lax.switch` on its strategy;
under `vmap` a switch on a per-run index runs every branch, so every run computes every
strategy's score matrices and selection, forward and backward."""

import functools

import jax
import jax.numpy as jnp

from ntxr import models, sampling, steps, together
from ntxr.bench import SHAPE, timing, training_steps


def switched_step(strategies: tuple, margin: float = 0.5):
  """A train step (state, batch, key, index) -> (state, loss): the encoders and Adam as
  `steps.train_step` runs them, the triplet loss of strategies[index] (`lax.switch`;
  with one strategy, that strategy's loss alone)."""
  def step(state, batch, key, index):
    dropout_key, sample_key = jax.random.split(key)
    def loss_fn(params):
      (audio, text), updates = state.apply_fn(
          state.variables(params), batch, train=True, mutable=["batch_stats"],
          rngs={"dropout": dropout_key})
      branches = [functools.partial(sampling.triplet_loss, strategy=strategy, margin=margin,
                                    key=sample_key, audio_mask=batch["audio_mask"],
                                    text_mask=batch["token_mask"])
                  for strategy in strategies]
      return jax.lax.switch(index, branches, audio, text, batch["audio_id"]), updates
    (value, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"]), value
  return step


def program_seconds(channels: tuple, strategies: tuple, seeds: int, n: int, shape: dict,
                    repeats: int, dtype: str = "float32") -> float:
  """Median seconds of one jitted step of len(strategies) x seeds runs as one vmapped
  `switched_step` program (states donated), each run its own parameters and key."""
  model = models.DualEncoder(vocab_size=shape["vocab"], channels=channels, dtype=dtype)
  count = len(strategies) * seeds
  states = together.stack([steps.create_train_state(
      model, jax.random.key(r), frames=shape["frames"], words=shape["words"],
      mel_bands=shape["mel_bands"]) for r in range(count)])
  batches = jax.device_put(together.stack([training_steps.random_batch(n, **shape)] * count))
  keys = jax.random.split(jax.random.key(1), count)
  index = jnp.repeat(jnp.arange(len(strategies)), seeds)
  step = jax.jit(jax.vmap(switched_step(tuple(strategies))), donate_argnums=0)
  def one_step():  # the states are donated: each call steps from the last one's
    nonlocal states
    states, losses = step(states, batches, keys, index)
    return losses
  return timing.time_call(one_step, repeats=repeats)


def run(widths: dict, strategies: list, seeds: int, n: int, repeats: int, shape: dict = None,
        dtype: str = "float32") -> list:
  """One row per CRNN width: the step time of the strategies' per-strategy programs
  (summed: they run one after another each step) and of one union program."""
  shape = shape or SHAPE
  rows = []
  for name, channels in widths.items():
    per_strategy = sum(program_seconds(channels, (strategy,), seeds, n, shape, repeats, dtype)
                       for strategy in strategies)
    union = program_seconds(channels, tuple(strategies), seeds, n, shape, repeats, dtype)
    rows.append(dict(width=name, channels=list(channels), n=n, dtype=dtype, **shape,
                     strategies=len(strategies), seeds=seeds,
                     per_strategy_ms=1e3 * per_strategy, union_ms=1e3 * union,
                     union_of_per_strategy=union / per_strategy))
  return rows


def format_table(rows: list) -> str:
  """The rows as a Markdown table."""
  return timing.markdown_table(
      [("CRNN width", "width", ""), ("N", "n", ""), ("frames", "frames", ""),
       ("strategies", "strategies", ""), ("seeds", "seeds", ""),
       ("per-strategy programs ms", "per_strategy_ms", ".0f"),
       ("union program ms", "union_ms", ".0f"),
       ("union / per-strategy", "union_of_per_strategy", ".2f")], rows)
