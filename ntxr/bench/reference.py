"""The triplet loss one anchor at a time, as the authors' PyTorch criterion computes it.

The benchmark times it against the kernels (in JAX, and in PyTorch with --torch_loop);
the tests check the kernels against it in NumPy float64. Each anchor scores its own
pool, picks its negative as its strategy's spec says (`specs.Strategy.pick` over the
scores its `needs` names) and adds its hinges; `score` decides how padding counts.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntxr import specs

@dataclasses.dataclass(frozen=True)
class ArrayOps:
  """The few array operations the loop needs, for one framework."""
  relu: Callable
  mean_last_two: Callable
  transpose_last_two: Callable
  index: Callable  # list of ints -> index array
  argmin: Callable
  argmax: Callable


JAX_OPS = ArrayOps(relu=jax.nn.relu, mean_last_two=lambda x: x.mean(axis=(-2, -1)),
                   transpose_last_two=lambda x: jnp.swapaxes(x, -1, -2),
                   index=jnp.asarray, argmin=jnp.argmin, argmax=jnp.argmax)
NUMPY_OPS = ArrayOps(relu=lambda x: np.maximum(x, 0), mean_last_two=lambda x: x.mean(axis=(-2, -1)),
                     transpose_last_two=lambda x: np.swapaxes(x, -1, -2),
                     index=np.asarray, argmin=np.argmin, argmax=np.argmax)


def torch_ops() -> ArrayOps:
  """ArrayOps for PyTorch, imported only when asked for."""
  import torch  # pylint: disable=import-outside-toplevel
  return ArrayOps(relu=torch.relu, mean_last_two=lambda x: x.mean(dim=(-2, -1)),
                  transpose_last_two=lambda x: x.transpose(-2, -1),
                  index=torch.tensor, argmin=torch.argmin, argmax=torch.argmax)


def padded_score(ops: ArrayOps) -> Callable:
  """The authors' score of x [..., L, E] against y [..., M, E]: relu(x y^T) averaged
  over all L x M pairs, padding included."""
  return lambda x, y: ops.mean_last_two(ops.relu(x @ ops.transpose_last_two(y)))


def per_anchor_loss(ops: ArrayOps, audio, text, audio_ids, strategy: str, margin: float,
                    rng: np.random.Generator, score: Callable = None, kept=None):
  """The loss of `ntxr.sampling.triplet_loss` on audio [N, T, E] and text [N, W, E].

  strategy: a name in `specs.STRATEGIES` with a pick. score(x, y): x [..., T, E] against
  y [..., W, E] -> [...]; default `padded_score`. A random pick draws with `rng`. kept:
  [N][N] bools, the candidates a filter left anchor i (default: all); the pool is those of
  another clip. Returns (loss, audio negatives, text negatives): the chosen index per
  anchor (None where the pick takes all, and for an anchor with an empty pool).
  """
  spec = specs.STRATEGIES.get(strategy)
  if spec is None or spec.pick is None:
    raise ValueError(f"the per-anchor loop knows no pick of strategy {strategy!r}")
  score = score or padded_score(ops)
  n = audio.shape[0]
  loss, audio_negs, text_negs = 0.0, [], []
  for i in range(n):
    audio_i, text_i = audio[i], text[i]
    positive = score(audio_i, text_i)
    pool = [j for j in range(n) if audio_ids[j] != audio_ids[i]
            and (kept is None or kept[i][j])]
    a = t = None
    if not pool:
      audio_negs.append(a)
      text_negs.append(t)
      continue
    pool_index = ops.index(pool)
    pick = {"argmax": ops.argmax, "argmin": ops.argmin,
            "closest": lambda s: ops.argmin(abs(s - positive))}.get(spec.pick)
    if spec.pick == "all" or spec.needs == "cross":
      audio_scores = score(audio[pool_index], text_i)
      text_scores = score(audio_i, text[pool_index])
      if spec.pick != "all":
        k_audio, k_text = int(pick(audio_scores)), int(pick(text_scores))
        a, t = pool[k_audio], pool[k_text]
        audio_scores, text_scores = audio_scores[k_audio], text_scores[k_text]
    else:
      if spec.pick == "random":
        a, t = int(rng.choice(pool)), int(rng.choice(pool))
      else:
        within = (score(text_i, text[pool_index]) if spec.needs == "text"
                  else score(audio_i, audio[pool_index]))
        a = t = pool[int(pick(within))]
      audio_scores, text_scores = score(audio[a], text_i), score(audio_i, text[t])
    audio_negs.append(a)
    text_negs.append(t)
    loss = loss + (ops.relu(audio_scores - positive + margin).mean()
                   + ops.relu(text_scores - positive + margin).mean())
  return loss / n, audio_negs, text_negs
