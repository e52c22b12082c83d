"""Negatives over a batch sharded across devices, without gathering it
(`--config.negatives=ring`; JAX only).

Under `gather` (the default) the step is one program over the global batch of G pairs,
and XLA computes the [G, G] score matrices, with their G x G frame-word products, on
every device. Under `ring` the loss runs in `jax.shard_map` over the mesh axis "data":
each of the D devices keeps its n = G / D pairs, and the other devices' embeddings come
round the ring by `ppermute`, one device's block at a time. As a block passes, a device
scores its own anchors against it, so it builds only its anchors' rows [n, G] of the
matrices the loss reads: the cross scores of its clips and of its captions, and the
within-modality scores a strategy selects by. From those rows every strategy selects
(`sampling.Rows`), every objective scores (`objectives.softmax_rows`,
`objectives.siglip_log_likelihood`), and the false-negative filter and soft relevance
act, as on one device; means over anchors are over every device's (psum). Random draws
are row i of the same [G, G] draw for anchor i on whichever device holds it.

Memory per device: its rows, O(n G) scalars, and one block in flight; the gradient goes
round the ring again, each block with its gradient so far, so no device keeps the
blocks that passed, and none holds the [G, G] products. Runs trained together step with
`gather`.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
import numpy as np

from ntxr import false_negatives, objectives, sampling, scores

Array = jax.Array
AXIS = "data"  # the mesh axis the batch is split over (`parallel.Devices`)


def global_mean(values: Array, mask: Optional[Array] = None, axis=None) -> Array:
  """The mean of values where mask holds (None: everywhere) over every device's anchors
  (axis None: all of them; else per entry of the other axes, then over devices)."""
  mask = jnp.ones(values.shape, bool) if mask is None else jnp.broadcast_to(mask, values.shape)
  total = jax.lax.psum(jnp.sum(jnp.where(mask, values, 0), axis=axis), AXIS)
  return total / jnp.maximum(jax.lax.psum(jnp.sum(mask, axis=axis), AXIS), 1)


def rows_round_the_ring(score_block, local, first_block):
  """score_block(local, block) -> a tree of [n, m] arrays, for every device's block as
  it comes round the ring (each device sends what it holds to the next), as [n, D m] in
  the global order of the blocks."""
  devices, me = jax.lax.axis_size(AXIS), jax.lax.axis_index(AXIS)
  forward = [(j, (j + 1) % devices) for j in range(devices)]
  def step(block, _):
    return jax.lax.ppermute(block, AXIS, forward), score_block(local, block)
  _, held = jax.lax.scan(step, first_block, length=devices)
  # At step k a device holds device (me - k)'s block: device j's came at step (me - j).
  ordered = lambda x: jnp.moveaxis(x[(me - jnp.arange(devices)) % devices], 0, 1)
  return jax.tree.map(lambda x: ordered(x).reshape(x.shape[1], -1), held)


def _cross_blocks(scorer: scores.Scorer, mine: tuple, passing: tuple) -> tuple:
  """(s_cross[my clips, passing captions], s_cross[passing clips, my captions].T) [n, m]
  of (audio, text, audio_mask, text_mask) tuples."""
  (audio, text, audio_mask, text_mask), (p_audio, p_text, p_audio_mask, p_text_mask) = (
      mine, passing)
  return (scorer.matrix(audio, p_text, audio_mask, p_text_mask),
          scorer.matrix(p_audio, text, p_audio_mask, text_mask).T)


def cross_rows(scorer: scores.Scorer, embedded: objectives.Embedded) -> tuple:
  """(by_audio, by_text) [n, G]: s_cross[a, :] of this device's clips a and s_cross[:, t]
  of its captions t, with gradient. The gradient goes round the ring again (`_cross_rows`'
  backward), so no device keeps the blocks that passed."""
  return _cross_rows(scorer, (embedded.audio, embedded.text),
                     (embedded.audio_mask, embedded.text_mask))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cross_rows(scorer, embeddings: tuple, masks: tuple) -> tuple:
  local = (*embeddings, *masks)
  return rows_round_the_ring(functools.partial(_cross_blocks, scorer), local, local)


def _cross_rows_forward(scorer, embeddings, masks):
  return _cross_rows(scorer, embeddings, masks), (embeddings, masks)


def _cross_rows_backward(scorer, saved, cotangents):
  """Each block comes round again with its gradient so far: a device adds its anchors'
  part (the cotangents' columns of the block's owner) to it and to its own embeddings'
  gradient, and after D steps every block is home with its whole gradient."""
  embeddings, masks = saved
  devices, me = jax.lax.axis_size(AXIS), jax.lax.axis_index(AXIS)
  forward = [(j, (j + 1) % devices) for j in range(devices)]
  n = embeddings[0].shape[0]
  zeros = jax.tree.map(jnp.zeros_like, embeddings)
  def step(carry, k):
    block, block_masks, block_gradient, own_gradient = carry
    owner_columns = tuple(jax.lax.dynamic_slice_in_dim(c, ((me - k) % devices) * n, n, axis=1)
                          for c in cotangents)
    _, vjp = jax.vjp(lambda mine, passing: _cross_blocks(
        scorer, (*mine, *masks), (*passing, *block_masks)), embeddings, block)
    mine, passing = vjp(owner_columns)
    moved = jax.lax.ppermute((block, block_masks, jax.tree.map(jnp.add, block_gradient,
                                                                passing)), AXIS, forward)
    return (*moved, jax.tree.map(jnp.add, own_gradient, mine)), None
  (_, _, home_gradient, own_gradient), _ = jax.lax.scan(
      step, (embeddings, masks, zeros, zeros), jnp.arange(devices))
  no_gradient = tuple(np.zeros(mask.shape, jax.dtypes.float0) for mask in masks)
  return jax.tree.map(jnp.add, own_gradient, home_gradient), no_gradient


_cross_rows.defvjp(_cross_rows_forward, _cross_rows_backward)


def within_rows(scorer: scores.Scorer, x: Array, mask: Array) -> Array:
  """[n, G]: this device's rows of a within-modality matrix of x [n, L, E], no gradient."""
  x = jax.lax.stop_gradient(x)
  score_block = lambda mine, passing: scorer.matrix(mine[0], passing[0], mine[1], passing[1])
  return rows_round_the_ring(score_block, (x, mask), (x, mask))


def loss_and_terms(embedded: objectives.Embedded, loss, *, learnt: dict, key: Array,
                   similarity: Optional[Array] = None, events: Optional[Array] = None):
  """Inside shard_map over AXIS, on this device's rows of the batch: (the loss, the same
  on every device; this device's anchors' LossTerms, weights [2, n, G]; the false-negative
  shares, the same on every device, or None), equal to what the step computes on the
  whole batch.

  embedded: this device's n pairs; loss: the run's `settings.Loss`; learnt: the
  objective's parameters; key: the batch's selection key; similarity [n, G]: its
  captions' rows of the caption similarity; events [n, K] bool: its clips' event kinds.
  """
  n = embedded.audio_ids.shape[0]
  anchors = jax.lax.axis_index(AXIS) * n + jnp.arange(n, dtype=jnp.int32)
  every_id = jax.lax.all_gather(embedded.audio_ids, AXIS, tiled=True)
  count = every_id.shape[0]
  pool = embedded.audio_ids[:, None] != every_id[None, :]
  scorer = scores.get_scorer(loss.score)
  by_audio, by_text = cross_rows(scorer, embedded)
  positive = jnp.take_along_axis(by_audio, anchors[:, None], axis=1)[:, 0]
  cross = sampling.Rows(*jax.lax.stop_gradient((by_audio, by_text, positive)), anchors)
  kept = pool
  if loss.filters:
    kept = false_negatives.filter_rows(
        pool, cross, similarity, max_similarity=loss.filter_similarity,
        max_share_of_positive=loss.filter_share_of_positive)
  if loss.objective == "triplet":
    value, terms = _triplet(embedded, loss, scorer, cross, (by_audio, by_text), kept, key,
                            count)
  else:
    value, terms = _whole_pool(loss, learnt, (by_audio, by_text), cross.positive, pool,
                               kept, similarity, count)
  shares = None
  if events is not None:
    every_events = jax.lax.all_gather(events, AXIS, tiled=True)
    false = jnp.all(events[:, None, :] == every_events[None, :, :], axis=-1) & pool
    shares = false_negatives.measured_shares(terms.weights, pool, kept, false,
                                             mean=global_mean)
  return value, terms, shares


def _triplet(embedded, loss, scorer, cross: sampling.Rows, with_gradient: tuple, kept,
             key, count: int):
  """The triplet loss and terms from this device's rows (`sampling.triplet_from_scores`)."""
  strategy = sampling.get_strategy(loss.strategy)
  rows = sampling.Rows(None, None, None, cross.anchors)
  if strategy.needs == "cross":
    rows = cross
  elif strategy.needs in ("audio", "text"):
    x, mask = ((embedded.audio, embedded.audio_mask) if strategy.needs == "audio"
               else (embedded.text, embedded.text_mask))
    within = within_rows(scorer, x, mask)
    rows = sampling.Rows(within, within, None, cross.anchors)
  chosen = strategy.select(rows, kept, key)
  by_audio, by_text = with_gradient
  positive = jnp.take_along_axis(by_audio, cross.anchors[:, None], axis=1)[:, 0]  # gradient
  return sampling.triplet_from_scores(
      positive, jnp.take_along_axis(by_text, chosen.audio, axis=1),
      jnp.take_along_axis(by_audio, chosen.text, axis=1), chosen, loss.margin, count,
      mean=global_mean)


def _whole_pool(loss, learnt: dict, with_gradient: tuple, positive, pool, kept, similarity,
                count):
  """A whole-pool objective's loss and terms from this device's rows, as
  `objectives.whole_pool_loss_and_terms` on the whole batch."""
  objective = loss.objective
  temperature = loss.temperature
  if "log_inverse_temperature" in learnt:
    temperature = jnp.exp(-learnt["log_inverse_temperature"])
  bias = learnt.get("bias", 0.0)
  by_audio, by_text = with_gradient
  positives = ~pool  # every row is a valid anchor: a sharded batch has no padding rows
  valid = jnp.ones(pool.shape[0], bool)
  z_audio, z_text = (s.astype(jnp.float32) / temperature for s in (by_audio, by_text))
  if objective == "siglip":
    pairs = positives | kept  # kept & kept.T, as kept is symmetric (settings refuse else)
    value = -jax.lax.psum(objectives.siglip_log_likelihood(z_audio, positives, pairs, bias),
                          AXIS) / count
  else:
    targets = positives.astype(jnp.float32)
    if objective == "soft":
      targets = false_negatives.relevance(similarity, positives, loss.relevance_slope,
                                          loss.relevance_offset)
    log_weights = None
    if objective == "hn_nce":
      log_weights = lambda z, pool: objectives.hard_negative_log_weights(z, pool, loss.beta)
    value = objectives.softmax_rows(
        objectives.AnchorRows(z_audio, targets, positives, kept, valid),
        objectives.AnchorRows(z_text, targets, positives, kept, valid),
        log_weights=log_weights, mean=global_mean)
  negative_logits = objectives.OBJECTIVES[objective].whole_pool.negative_logits
  hyper = dict(beta=loss.beta, bias=jax.lax.stop_gradient(bias))
  frozen_temperature = jax.lax.stop_gradient(temperature)
  s_audio, s_text = jax.lax.stop_gradient((by_audio, by_text))
  weights = jnp.stack([
      objectives.pool_weights(negative_logits(s_text / frozen_temperature, kept, **hyper), kept),
      objectives.pool_weights(negative_logits(s_audio / frozen_temperature, kept, **hyper),
                              kept)])
  negative = jnp.stack([sampling.masked_mean(s_text, kept, axis=1),
                        sampling.masked_mean(s_audio, kept, axis=1)], axis=1)
  return value, sampling.LossTerms(positive, negative, kept.any(axis=1), weights)


def sharded_loss_and_terms(mesh, embedded: objectives.Embedded, loss, *, learnt: dict,
                           key: Array, similarity: Optional[Array] = None,
                           events: Optional[Array] = None):
  """`loss_and_terms` on the global batch split by rows over `mesh`'s AXIS (jit-traced
  arrays [G, ...]): (loss, LossTerms [G] without their weights, shares or None)."""
  rows, same = PartitionSpec(AXIS), PartitionSpec()
  def run(embedded, learnt, key, similarity, events):
    value, terms, shares = loss_and_terms(embedded, loss, learnt=learnt, key=key,
                                          similarity=similarity, events=events)
    return value, terms._replace(weights=None), shares
  return jax.shard_map(
      run, mesh=mesh, in_specs=(rows, same, same, rows, rows),
      out_specs=(same, sampling.LossTerms(rows, rows, rows, None), same),
      check_vma=False)(embedded, learnt, key, similarity, events)
