"""Several runs as one program: train states stacked on a leading runs axis [R, ...] and
the training step vmapped over it, so that R runs of one loss setting (an ablation's
seeds, or its learning rates) pay one step's kernel launches and idle time, not R.

  states = together.stack([state_a, state_b, state_c])           # [3, ...] every leaf
  states, statistics = together.train_step(states, batches, keys, loss=loss)
  state_b = together.unstack(states)[1]

Each run keeps everything of its own: parameters, Adam moments, BatchNorm statistics,
learning rate (the optimizer's injected hyperparameter, a vector over runs) and random
keys; `batches` are stacked per run ([R, B, ...]) or, with shared_batch, one batch all
runs read (runs of one seed see the same batches). Like `steps`, this module imports no
TensorFlow.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ntxr import settings, steps


def stack(states: list) -> steps.TrainState:
  """R train states of one setting -> one whose every leaf has a leading [R] axis."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def unstack(states: steps.TrainState) -> list:
  """The inverse of `stack`: the R train states, in order."""
  count = len(jax.tree.leaves(states)[0])
  return [jax.tree.map(lambda leaf, r=r: leaf[r], states) for r in range(count)]


def pad_and_stack(batches: list) -> dict:
  """R batches of numpy arrays (dicts of [B, ...]) -> one of [R, B, ...], each batch's
  audio and audio_mask padded with zeros to the longest one's frames (a clip's embedding
  does not depend on its batch's padding, `ntxr.models`)."""
  frames = max(batch["audio"].shape[1] for batch in batches)
  pad = lambda batch: frames - batch["audio"].shape[1]
  padded = [dict(batch, audio=np.pad(batch["audio"], ((0, 0), (0, pad(batch)), (0, 0))),
                 audio_mask=np.pad(batch["audio_mask"], ((0, 0), (0, pad(batch)))))
            for batch in batches]
  return {name: np.stack([batch[name] for batch in padded]) for name in padded[0]}


def train_step(states: steps.TrainState, batches: dict, keys: jax.Array, *,
               loss: settings.Loss = settings.Loss(), shared_batch: bool = False):
  """One optimizer step of every run: (states [R], batches [R, B, ...] or [B, ...] with
  shared_batch, keys [R]) -> (states [R], TrainingStatistics of [R] each). Each run's
  step is `steps.train_step` exactly; jit it with donate_argnums=0."""
  step = functools.partial(steps.train_step, loss=loss)
  return jax.vmap(step, in_axes=(0, None if shared_batch else 0, 0))(states, batches, keys)


def eval_loss(states: steps.TrainState, batches: dict, keys: jax.Array, *,
              loss: settings.Loss = settings.Loss()) -> jax.Array:
  """Each run's loss on its batch in inference mode: (states [R], batches [R, B, ...],
  keys [R]) -> [R], each `steps.eval_loss` exactly."""
  return jax.vmap(functools.partial(steps.eval_loss, loss=loss))(states, batches, keys)


def set_learning_rates(states: steps.TrainState, learning_rates) -> steps.TrainState:
  """The stacked states with each run's learning rate set (a vector [R]); unchanged where
  the optimizer schedules its own."""
  if steps.scheduled(states):
    return states
  hyperparams = dict(states.opt_state.hyperparams,
                     learning_rate=jnp.asarray(learning_rates, jnp.float32))
  return states.replace(opt_state=states.opt_state._replace(hyperparams=hyperparams))
