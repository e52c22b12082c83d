"""Runs trained together (ntxr.together): R runs vmapped over a runs axis step exactly as
R separate runs do."""

import functools

import jax
import numpy as np
import pytest

from ntxr import memory as memory_lib, models, settings, steps, together
from ntxr.bench import training_steps

SHAPE = dict(frames=64, words=6, mel_bands=64, vocab=40)


def separate_and_together(loss, shared_batch, count=3, steps_taken=2):
  """(initial states, then per step: [(state, statistics)] of each run stepped apart,
  [state] of the runs stepped together, their stacked statistics); each state with a
  memory of loss.memory_batches slots, if any."""
  model = models.DualEncoder(vocab_size=SHAPE["vocab"], embed_dim=8, channels=(2, 4, 4, 4, 4))
  rates = [1e-3 * (seed + 1) for seed in range(count)]  # one optimizer, its own rate each
  states = [steps.set_learning_rate(steps.create_train_state(
      model, jax.random.key(seed), frames=SHAPE["frames"], words=SHAPE["words"],
      mel_bands=SHAPE["mel_bands"]), rate) for seed, rate in enumerate(rates)]
  if loss.memory_batches:
    states = [steps.with_memory(state, memory_lib.empty(
        state.apply_fn, state.variables(), batches=loss.memory_batches, batch_size=8,
        frames=SHAPE["frames"], words=SHAPE["words"], feature_width=SHAPE["mel_bands"],
        event_kinds=None, vector_width=None)) for state in states]
  batches = [training_steps.random_batch(8, **SHAPE) for _ in range(count)]
  for r, batch in enumerate(batches):  # each run its own batch, unless shared
    batch["audio"] = batch["audio"] * (1 + r * (not shared_batch))
  keys = [jax.random.key(100 + r) for r in range(count)]
  one = jax.jit(functools.partial(steps.train_step, loss=loss))
  step_all = jax.jit(functools.partial(together.train_step, loss=loss,
                                       shared_batch=shared_batch))
  stacked_batches = batches[0] if shared_batch else together.stack(batches)
  apart, stacked, after = list(states), together.stack(states), []
  for step in range(steps_taken):
    stepped = [one(state, batch, jax.random.fold_in(key, step))
               for state, batch, key in zip(apart, batches, keys)]
    apart = [state for state, _ in stepped]
    stacked, statistics = step_all(stacked, stacked_batches,
                                   jax.vmap(jax.random.fold_in, (0, None))(
                                       jax.numpy.stack(keys), step))
    after.append((stepped, together.unstack(stacked), statistics))
  return states, after


@pytest.mark.parametrize("strategy, shared_batch, memory_batches",
                         [("semihard_cross", False, 0), ("hard_audio", True, 0),
                          ("hard_cross", False, 2)])
def test_runs_stepped_together_equal_the_runs_stepped_apart(strategy, shared_batch,
                                                            memory_batches):
  """Three runs (own initial parameters, learning rates and keys; own batches, or one
  batch shared as runs of one seed share theirs). After one
  step the loss, gradient norm, triplet statistics and BatchNorm statistics agree to 1e-5,
  and so do the parameters, to a tenth of the learning rate: Adam's first step moves
  each by its learning rate times g / (|g| + 1e-8). Where the separate run's gradient is
  at rounding level (below about 1e-6, so it moved less than 0.99 of the rate; the input
  BatchNorm's scale, which the next BatchNorm normalises away), vmapped reductions, summing
  in another order, round differently: there each must move by at most the rate. After a
  second step from those parameters the loss still agrees to 1e-5 (with a memory, the
  first step's batch among its negatives, and the memories then hold the same)."""
  initial, after = separate_and_together(
      settings.Loss(strategy=strategy, memory_batches=memory_batches), shared_batch)
  for step, (separate, joined, statistics) in enumerate(after, 1):
    for r, ((state, alone), stepped) in enumerate(zip(separate, joined)):
      rate = 1e-3 * (r + 1)
      np.testing.assert_allclose(statistics.loss[r], alone.loss, rtol=1e-5)
      if memory_batches:
        np.testing.assert_array_equal(stepped.memory.age, state.memory.age)
        np.testing.assert_allclose(stepped.memory.text, state.memory.text, rtol=1e-5,
                                   atol=1e-6)
      if step == 2:
        continue
      assert int(stepped.step) == int(state.step) == 1
      assert float(stepped.opt_state.hyperparams["learning_rate"]) == pytest.approx(rate)
      def same_update(start, apart, joint, rate=rate):
        moved = np.abs(apart - start) >= 0.99 * rate  # |g| above 1e-6
        np.testing.assert_allclose(joint[moved], apart[moved], atol=rate / 10)
        assert np.all(np.abs(joint - start)[~moved] <= rate * 1.001)
        return moved.sum()
      checked = jax.tree.map(same_update, initial[r].params, state.params, stepped.params)
      # Most weights moved (the word rows a batch does not use have no gradient).
      assert sum(jax.tree.leaves(checked)) > 0.5 * sum(
          np.size(p) for p in jax.tree.leaves(state.params))
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                   state.batch_stats, stepped.batch_stats)
      for field in ("grad_norm", "positive_mean", "negative_mean", "share_zero_loss"):
        np.testing.assert_allclose(getattr(statistics, field)[r], getattr(alone, field),
                                   rtol=1e-5, atol=1e-6)


def test_each_run_keeps_its_own_learning_rate():
  model = models.DualEncoder(vocab_size=10, embed_dim=8, channels=(2, 4, 4, 4, 4))
  state = steps.create_train_state(model, jax.random.key(0), frames=8, words=3, mel_bands=64)
  states = together.set_learning_rates(together.stack([state, state]), [1e-3, 1e-5])
  rates = [float(s.opt_state.hyperparams["learning_rate"]) for s in together.unstack(states)]
  assert rates == pytest.approx([1e-3, 1e-5])
