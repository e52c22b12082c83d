"""Negatives over a batch sharded across devices, without gathering it
(`--config.negatives=ring`; JAX only).

Under `gather` (the default) the step is one program over the global batch of G pairs,
and XLA computes the [G, G] score matrices, with their G x G frame-word products, on
every device. Under `ring` the loss runs in `jax.shard_map` over the mesh axis "data":
each of the D devices keeps its n = G / D pairs, and the other devices' embeddings come
round the ring by `ppermute`, one device's block at a time. As a block passes, a device
scores its own anchors against it, so it builds only its anchors' rows [n, G] of the
matrices the loss reads: the cross scores of its clips and of its captions (each entry
computed once going forward), and the within-modality scores a strategy selects by.
From those rows every strategy selects (`sampling.Rows`), every objective scores
(`objectives.softmax_rows`, `objectives.siglip_log_likelihood`), and the false-negative
filter and soft relevance act, as on one device; means over anchors are over every
device's (psum). Random draws are anchor i's own wherever it lives.

Device memory: its rows, O(n G) scalars, and one block in flight (of frames, half a
block: `WITHIN_PARTS`); the gradient goes round the ring again, each block with its
gradient so far, so no device keeps the blocks that passed, and none holds the [G, G]
products. Runs trained together are refused: they take `gather`.

A cross-batch memory (`ntxr.memory`, every device's whole) adds its M entries as
candidates after the batch's: the rows are [n, G + M]. Under `gather` a memory takes
this same path, the whole batch the rows of a mapped axis of one (`rows_loss_and_terms`
without a mesh). Objectives registered with their own loss (`objectives.register`)
compute it from the whole batch: they are refused with ring or a memory.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
import numpy as np

from ntxr import false_negatives, memory as memory_lib, objectives, sampling, scores

Array = jax.Array
AXIS = "data"  # the mesh axis the batch is split over (`parallel.Devices`)
# A within-modality matrix's blocks go round in this many parts, one part in flight at a
# time: a block of frames is as large as the device's embeddings of its clips.
WITHIN_PARTS = 2


def global_mean(values: Array, mask: Optional[Array] = None) -> Array:
  """The mean of values where mask holds (None: everywhere), over every device's."""
  mask = jnp.ones(values.shape, bool) if mask is None else jnp.broadcast_to(mask, values.shape)
  total = jax.lax.psum(jnp.sum(jnp.where(mask, values, 0)), AXIS)
  return total / jnp.maximum(jax.lax.psum(jnp.sum(mask), AXIS), 1)


def cross_rows(scorer: scores.Scorer, embedded: objectives.Embedded,
               stored: Optional[objectives.Embedded] = None) -> tuple:
  """(by_audio, by_text) [n, G + M]: s_cross[a, :] of this device's clips a and
  s_cross[:, t] of its captions t, with gradient (`_cross_rows`), against the batch's G
  and the memory's M `stored` entries (none: M = 0)."""
  if jax.lax.axis_size(AXIS) == 1:  # the whole batch: one matrix and its transpose, by
    # autodiff (a custom VJP's backward is traced outside the mapped axis, unbound there)
    matrix = scorer.matrix(*embedded[:4])
    rows = matrix, matrix.T
  else:
    rows = _cross_rows(scorer, (embedded.audio, embedded.text),
                       (embedded.audio_mask, embedded.text_mask))
  if stored is None:
    return rows
  by_audio, by_text = rows
  return (jnp.concatenate([by_audio, scorer.matrix(embedded.audio, stored.text,
                                                   embedded.audio_mask, stored.text_mask)], 1),
          jnp.concatenate([by_text, scorer.matrix(stored.audio, embedded.text,
                                                  stored.audio_mask, embedded.text_mask).T], 1))


def _ring() -> tuple:
  """(D, this device's index, the pairs of `ppermute` to the next device)."""
  devices = jax.lax.axis_size(AXIS)
  return devices, jax.lax.axis_index(AXIS), [(j, (j + 1) % devices) for j in range(devices)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cross_rows(scorer, embeddings: tuple, masks: tuple) -> tuple:
  """The captions go round the ring, each block with its owner's by_text rows so far: a
  device scores its clips against the passing captions once, keeps the block as its
  by_audio columns and writes its transpose into the passing rows, which come home
  whole after D steps (the captions stop after D - 1). Each entry of s_cross is computed
  once (the backward pass scores each block again)."""
  (audio, text), (audio_mask, text_mask) = embeddings, masks
  devices, me, forward = _ring()
  n = audio.shape[0]
  dtype = jax.eval_shape(scorer.matrix, audio, text, audio_mask, text_mask).dtype
  def visit(captions, caption_mask, their_rows):  # -> (their rows, [my clips, theirs])
    block = scorer.matrix(audio, captions, audio_mask, caption_mask)
    return jax.lax.dynamic_update_slice_in_dim(their_rows, block.T, me * n, axis=1), block
  def step(carry, _):
    their_rows, block = visit(*carry)
    return jax.lax.ppermute((*carry[:2], their_rows), AXIS, forward), block
  last, held = jax.lax.scan(step, (text, text_mask, jnp.zeros((n, devices * n), dtype)),
                            length=devices - 1)
  their_rows, block = visit(*last)
  return (_in_global_order(jnp.concatenate([held, block[None]])),
          jax.lax.ppermute(their_rows, AXIS, forward))


def _in_global_order(held: Array) -> Array:
  """[D, n, m] blocks, held[k] from device (me - k) (a ring's step k) -> [n, D m] in the
  devices' order."""
  devices, me, _ = _ring()
  ordered = jnp.moveaxis(held[(me - jnp.arange(devices)) % devices], 0, 1)
  return ordered.reshape(held.shape[1], -1)


def _cross_rows_forward(scorer, embeddings, masks):
  return _cross_rows(scorer, embeddings, masks), (embeddings, masks)


def _cross_rows_backward(scorer, saved, cotangents):
  """The captions go round again with their rows' cotangents and their gradient so far:
  a device takes each block's part of both cotangents, adds the block's gradient to the
  passing one and its clips' to its own (sums in float32, whatever the embeddings'
  dtype); after D steps every block's gradient is home whole (the captions and their
  cotangents stop after D - 1). No device keeps the blocks that passed."""
  (audio, text), (audio_mask, text_mask) = saved
  by_audio_cotangent, by_text_cotangent = cotangents
  devices, me, forward = _ring()
  n = audio.shape[0]
  def visit(carry, k):  # -> (their gradient, my clips' gradient) with this block's parts
    captions, caption_mask, their_cotangent, their_gradient, audio_gradient = carry
    cotangent = (jax.lax.dynamic_slice_in_dim(by_audio_cotangent, ((me - k) % devices) * n,
                                              n, axis=1)
                 + jax.lax.dynamic_slice_in_dim(their_cotangent, me * n, n, axis=1).T)
    _, vjp = jax.vjp(lambda a, t: scorer.matrix(a, t, audio_mask, caption_mask),
                     audio, captions)
    audio_part, caption_part = vjp(cotangent)
    return (their_gradient + caption_part.astype(jnp.float32),
            audio_gradient + audio_part.astype(jnp.float32))
  def step(carry, k):
    their_gradient, audio_gradient = visit(carry, k)
    return (*jax.lax.ppermute((*carry[:3], their_gradient), AXIS, forward),
            audio_gradient), None
  start = (text, text_mask, by_text_cotangent, jnp.zeros(text.shape, jnp.float32),
           jnp.zeros(audio.shape, jnp.float32))
  last, _ = jax.lax.scan(step, start, jnp.arange(devices - 1))
  their_gradient, audio_gradient = visit(last, devices - 1)
  text_gradient = jax.lax.ppermute(their_gradient, AXIS, forward)
  no_gradient = tuple(np.zeros(mask.shape, jax.dtypes.float0) for mask in (audio_mask,
                                                                         text_mask))
  return (audio_gradient.astype(audio.dtype), text_gradient.astype(text.dtype)), no_gradient


_cross_rows.defvjp(_cross_rows_forward, _cross_rows_backward)


def within_rows(scorer: scores.Scorer, x: Array, mask: Array) -> Array:
  """[n, G]: this device's rows of a within-modality matrix of x [n, L, E], no gradient,
  the other devices' x passed round the ring in `WITHIN_PARTS` parts of their rows."""
  x = jax.lax.stop_gradient(x)
  if jax.lax.axis_size(AXIS) == 1:  # the whole batch: each block pair once
    return scorer.symmetric(x, mask)
  devices, _, forward = _ring()
  score = lambda block: scorer.matrix(x, block[0], mask, block[1])
  def step(block, _):
    return jax.lax.ppermute(block, AXIS, forward), score(block)
  parts = []
  for rows in np.array_split(np.arange(x.shape[0]), min(WITHIN_PARTS, x.shape[0])):
    last, held = jax.lax.scan(step, (x[rows], mask[rows]), length=devices - 1)
    parts.append(jnp.concatenate([held, score(last)[None]]))  # [D, n, rows], the last stays
  return _in_global_order(jnp.concatenate(parts, axis=2))


def loss_and_terms(embedded: objectives.Embedded, loss, *, learnt: dict, key: Array,
                   similarity: Optional[Array] = None, events: Optional[Array] = None,
                   memory: Optional[memory_lib.Memory] = None,
                   caption_vectors: Optional[Array] = None):
  """Inside shard_map over AXIS, on this device's rows of the batch: (the loss, the same
  on every device; this device's anchors' LossTerms, weights [2, n, G + M]; the
  false-negative shares, the same on every device, or None), equal to what the step
  computes on the whole batch.

  embedded: this device's n pairs; loss: the run's `settings.Loss`; learnt: the
  objective's parameters; key: the batch's selection key; similarity [n, G]: its
  captions' rows of the caption similarity; events [n, K] bool: its clips' event kinds;
  memory: a cross-batch memory, every device's whole (`ntxr.memory`): its M entries are
  candidates after the batch's G, negatives of the anchors of other clips, their
  captions compared with the anchors' by caption_vectors [n, D] (or the events).
  """
  n = embedded.audio_ids.shape[0]
  anchors = jax.lax.axis_index(AXIS) * n + jnp.arange(n, dtype=jnp.int32)
  every_id = jax.lax.all_gather(embedded.audio_ids, AXIS, tiled=True)
  count = every_id.shape[0]
  pool = embedded.audio_ids[:, None] != every_id[None, :]
  positives = ~pool
  stored = None if memory is None else memory.entries()
  if memory is not None:
    pool = jnp.concatenate([pool, memory.filled()[None, :] & (
        embedded.audio_ids[:, None] != stored.audio_ids[None, :])], axis=1)
    positives = jnp.pad(positives, ((0, 0), (0, memory.size)))
    if loss.compares_captions:
      mine, theirs = ((events, memory.flat("events")) if loss.similarity == "events" else
                      (caption_vectors, memory.flat("caption_vectors")))
      similarity = jnp.concatenate(
          [similarity, false_negatives.similarity_to(loss.similarity, mine, theirs)], axis=1)
  candidates = pool.shape[1]
  scorer = scores.get_scorer(loss.score)
  objective = objectives.get_objective(loss.objective)
  if loss.objective != "triplet" and objective.whole_pool is None:
    raise ValueError(f"--config.negatives=ring and the cross-batch memory compute the "
                     f"triplet loss and the whole-pool objectives; {loss.objective!r} "
                     f"computes its own loss from the whole batch: use "
                     f"--config.negatives=gather without a memory")
  every_negative = loss.objective != "triplet" or _negatives_an_anchor(
      loss.strategy, n, candidates) > 1
  if every_negative:  # the rows are the loss's, with gradient
    with_gradient = cross_rows(scorer, embedded, stored)
    frozen = jax.lax.stop_gradient(with_gradient)
  elif (sampling.get_strategy(loss.strategy).needs == "cross"
        or loss.filter_share_of_positive):  # the rows choose; one negative is scored apart
    with_gradient = None
    frozen = cross_rows(scorer, jax.lax.stop_gradient(embedded), stored)
  else:  # no rows of the cross scores at all
    with_gradient, frozen = None, (None, None)
  positive = (jax.lax.stop_gradient(scorer.paired(*embedded[:4])) if frozen[0] is None else
              jnp.take_along_axis(frozen[0], anchors[:, None], axis=1)[:, 0])
  cross = sampling.Rows(*frozen, positive, anchors)
  kept = pool
  if loss.filters:
    kept = false_negatives.filter_rows(
        pool, cross, similarity, max_similarity=loss.filter_similarity,
        max_share_of_positive=loss.filter_share_of_positive)
  if loss.objective == "triplet":
    value, terms = _triplet(embedded, loss, scorer, kept, key, count, cross, with_gradient,
                            stored)
  else:
    kept_transposed = kept
    if loss.objective == "siglip" and loss.filter_share_of_positive:
      every_positive = jax.lax.all_gather(positive, AXIS, tiled=True)
      if stored is not None:
        every_positive = jnp.concatenate([every_positive, scorer.paired(*stored[:4])])
      kept_transposed = false_negatives.filter_rows(
          pool, cross, similarity, max_similarity=loss.filter_similarity,
          max_share_of_positive=loss.filter_share_of_positive,
          candidates_positive=every_positive)
    value, terms = _whole_pool(loss, learnt, with_gradient, cross, positives, kept,
                               kept_transposed, similarity, count)
  shares = None
  if events is not None:
    every_events = jax.lax.all_gather(events, AXIS, tiled=True)
    if memory is not None:
      every_events = jnp.concatenate([every_events, memory.flat("events")])
    false = false_negatives.same_events(events, every_events) & pool
    shares = false_negatives.measured_shares(terms.weights, pool, kept, false,
                                             mean=global_mean)
  return value, terms, shares


def _negatives_an_anchor(strategy: str, n: int, count: int) -> int:
  """K: how many negatives the strategy's selector gives an anchor (traced on shapes)."""
  rows = jax.ShapeDtypeStruct((n, count), jnp.float32)
  found = jax.eval_shape(
      sampling.get_strategy(strategy).select,
      sampling.Rows(rows, rows, jax.ShapeDtypeStruct((n,), jnp.float32),
                    jax.ShapeDtypeStruct((n,), jnp.int32)),
      jax.ShapeDtypeStruct((n, count), jnp.bool_), jax.random.key(0))
  return found.audio.shape[1]


def collect_round_the_ring(wanted: list) -> list:
  """For each (local, chosen) of `wanted`: the rows chosen [n] (indices among the G) of
  every device's `local`, a tuple of [n, ...] arrays, taken from each device's block as
  it comes round, in one pass for all; the gradient goes back to the owners. An index
  below 0 takes the last row, as indexing does."""
  if jax.lax.axis_size(AXIS) == 1:  # the whole batch (a custom VJP's backward is traced
    # outside the mapped axis, unbound there)
    return [jax.tree.map(lambda x: x[chosen], local) for local, chosen in wanted]
  devices = jax.lax.axis_size(AXIS)
  n = wanted[0][1].shape[0]
  chosen = [jnp.where(c < 0, devices * n - 1, c) for _, c in wanted]
  return _fetch_rows([local for local, _ in wanted], chosen)


@jax.custom_vjp
def _fetch_rows(own: list, chosen: list) -> list:
  """Each device's blocks go round: from each passing block a device takes the rows of
  `chosen` that block holds (the last block taken from stays). Differentiated by
  `_fetch_rows_backward`, which keeps only the indices: autodiff of the takes would keep
  each step's [n, ...] choice of rows."""
  devices, me, forward = _ring()
  n = chosen[0].shape[0]
  def take(indices, block, so_far, k):  # the rows of `indices` that `block` holds
    here = indices // n == (me - k) % devices
    return jax.tree.map(lambda kept, x: jnp.where(
        here.reshape((n,) + (1,) * (x.ndim - 1)), x[indices % n], kept), so_far, block)
  def step(carry, k):
    blocks, taken = carry
    taken = [take(*entry, k) for entry in zip(chosen, blocks, taken)]
    return (jax.lax.ppermute(blocks, AXIS, forward), taken), None
  (last, taken), _ = jax.lax.scan(
      step, (own, [jax.tree.map(jnp.zeros_like, local) for local in own]),
      jnp.arange(devices - 1))
  return [take(*entry, devices - 1) for entry in zip(chosen, last, taken)]


def _fetch_rows_forward(own, chosen):
  return _fetch_rows(own, chosen), chosen


def _fetch_rows_backward(chosen, cotangents):
  """The rows' cotangents go round with their indices; each device adds the rows it owns
  into its blocks' gradient (sums in float32, whatever the blocks' dtype)."""
  devices, me, forward = _ring()
  n = chosen[0].shape[0]
  differentiable = lambda c: c.dtype != jax.dtypes.float0  # not a mask
  def owned(indices, passing, gradient):  # gradient + the passing rows this device owns
    row = jnp.where(indices // n == me, indices % n, n)  # n: dropped
    return jax.tree.map(lambda g, c: g.at[row].add(c, mode="drop"), gradient, passing)
  passing = jax.tree.map(lambda c: c.astype(jnp.float32) if differentiable(c) else None,
                         cotangents)
  def step(carry, _):
    indices, passing, gradient = carry
    gradient = [owned(*entry) for entry in zip(indices, passing, gradient)]
    return (*jax.lax.ppermute((indices, passing), AXIS, forward), gradient), None
  (indices, passing, gradient), _ = jax.lax.scan(
      step, (chosen, passing, jax.tree.map(jnp.zeros_like, passing)), length=devices - 1)
  gradient = [owned(*entry) for entry in zip(indices, passing, gradient)]
  own = jax.tree.map(lambda g, c: c if g is None else g.astype(c.dtype), gradient,
                     cotangents, is_leaf=lambda g: g is None)
  return own, [np.zeros(c.shape, jax.dtypes.float0) for c in chosen]


_fetch_rows.defvjp(_fetch_rows_forward, _fetch_rows_backward)


def _triplet(embedded, loss, scorer, kept, key, count: int, cross: sampling.Rows,
             with_gradient: Optional[tuple], stored: Optional[objectives.Embedded]):
  """The triplet loss and terms from this device's rows (`sampling.triplet_from_scores`):
  one negative an anchor is scored with its embeddings fetched round the ring
  (`collect_round_the_ring`, both modalities in one pass) or from the memory's `stored`
  entries (candidates from `count` on); full_batch's every negative from the rows with
  gradient."""
  strategy = sampling.get_strategy(loss.strategy)
  anchors = cross.anchors
  rows = sampling.Rows(None, None, None, anchors)
  if strategy.needs == "cross":
    rows = cross
  elif strategy.needs in ("audio", "text"):
    side = lambda e: ((e.audio, e.audio_mask) if strategy.needs == "audio"
                      else (e.text, e.text_mask))
    x, mask = side(embedded)
    within = within_rows(scorer, x, mask)
    if stored is not None:
      stored_x, stored_mask = side(stored)
      within = jnp.concatenate(
          [within, scorer.matrix(jax.lax.stop_gradient(x), stored_x, mask, stored_mask)], 1)
    rows = sampling.Rows(within, within, None, anchors)
  chosen = strategy.select(rows, kept, key)
  if with_gradient is not None:  # every negative: read from the rows
    by_audio, by_text = with_gradient
    positive = jnp.take_along_axis(by_audio, anchors[:, None], axis=1)[:, 0]
    scored = (positive, jnp.take_along_axis(by_text, chosen.audio, axis=1),
              jnp.take_along_axis(by_audio, chosen.text, axis=1))
  else:
    audio, text = embedded.audio, embedded.text
    audio_mask, text_mask = embedded.audio_mask, embedded.text_mask
    audio_index, text_index = chosen.audio[:, 0], chosen.text[:, 0]
    (negative_audio, negative_audio_mask), (negative_text, negative_text_mask) = (
        collect_round_the_ring([((audio, audio_mask), audio_index),
                                ((text, text_mask), text_index)]))
    audio_negative = scorer.paired(negative_audio, text, negative_audio_mask, text_mask)
    text_negative = scorer.paired(audio, negative_text, audio_mask, negative_text_mask)
    if stored is not None:  # a negative from the memory replaces the batch's
      entry = lambda index: jnp.clip(index - count, 0, stored.audio_ids.shape[0] - 1)
      audio_negative = jnp.where(audio_index >= count, scorer.paired(
          stored.audio[entry(audio_index)], text, stored.audio_mask[entry(audio_index)],
          text_mask), audio_negative)
      text_negative = jnp.where(text_index >= count, scorer.paired(
          audio, stored.text[entry(text_index)], audio_mask,
          stored.text_mask[entry(text_index)]), text_negative)
    scored = (scorer.paired(audio, text, audio_mask, text_mask), audio_negative[:, None],
              text_negative[:, None])
  return sampling.triplet_from_scores(*scored, chosen, loss.margin, kept.shape[1],
                                      mean=global_mean)


def _whole_pool(loss, learnt: dict, with_gradient: tuple, cross: sampling.Rows, positives,
                kept, kept_transposed, similarity, count: int):
  """A whole-pool objective's loss and terms from this device's rows over the batch's
  `count` candidates and the memory's after them, as `objectives.whole_pool_loss_and_terms`
  on the whole batch; positives [n, G + M] bool: the anchors' own clip's captions in the
  batch (none in the memory); kept_transposed: this device's rows of the filtered pool's
  transpose (siglip's pairs are in both pools)."""
  temperature, bias = objectives.learnt_scalars(learnt, loss.temperature)
  by_audio, by_text = with_gradient
  valid = jnp.ones(positives.shape[0], bool)  # a training batch has no padding rows
  z_audio, z_text = (s.astype(jnp.float32) / temperature for s in (by_audio, by_text))
  if loss.objective == "siglip":
    # Each pair once: the anchor clips' with every caption, then the memory's clips' with
    # the anchor captions.
    pairs = positives | (kept & kept_transposed)
    likelihood = (objectives.siglip_log_likelihood(z_audio, positives, pairs, bias)
                  + objectives.siglip_log_likelihood(z_text[:, count:], positives[:, count:],
                                                     pairs[:, count:], bias))
    value = -jax.lax.psum(likelihood, AXIS) / count
  else:
    targets = positives.astype(jnp.float32)
    if loss.objective == "soft":
      targets = false_negatives.relevance(similarity, positives, loss.relevance_slope,
                                          loss.relevance_offset)
    log_weights = None
    if loss.objective == "hn_nce":
      log_weights = lambda z, pool: objectives.hard_negative_log_weights(z, pool, loss.beta)
    value = objectives.softmax_rows(
        objectives.AnchorRows(z_audio, targets, positives, kept, valid),
        objectives.AnchorRows(z_text, targets, positives, kept, valid),
        log_weights=log_weights, mean=global_mean)
  return value, objectives.pool_terms(loss.objective, cross, objectives.Pools(kept, kept),
                                      temperature=temperature, beta=loss.beta, bias=bias)


def rows_loss_and_terms(embedded: objectives.Embedded, loss, *, learnt: dict, key: Array,
                        mesh=None, similarity: Optional[Array] = None,
                        events: Optional[Array] = None,
                        memory: Optional[memory_lib.Memory] = None,
                        caption_vectors: Optional[Array] = None):
  """`loss_and_terms` on the global batch (jit-traced arrays [G, ...]; the memory whole on
  every device): split by rows over `mesh`'s AXIS, (loss, LossTerms [G] without their
  weights, shares or None); or, with no mesh (a memory under gather), the whole batch as
  the rows of a mapped axis of one, which XLA partitions as it does the batch, its
  LossTerms with their weights [2, G, G + M]."""
  by_row = dict(similarity=similarity, events=events, caption_vectors=caption_vectors)
  def run(embedded, by_row, learnt, key, memory):
    return loss_and_terms(embedded, loss, learnt=learnt, key=key, memory=memory, **by_row)
  if mesh is None:
    one = lambda tree: jax.tree.map(lambda x: x[None], tree)
    found = jax.vmap(run, axis_name=AXIS, in_axes=(0, 0, None, None, None))(
        one(embedded), one(by_row), learnt, key, memory)
    return jax.tree.map(lambda x: x[0], found)
  def sharded(*args):
    value, terms, shares = run(*args)
    return value, terms._replace(weights=None), shares
  rows, replicated = PartitionSpec(AXIS), PartitionSpec()
  return jax.shard_map(
      sharded, mesh=mesh, in_specs=(rows, rows, replicated, replicated, replicated),
      out_specs=(replicated, sampling.LossTerms(rows, rows, rows, None), replicated),
      check_vma=False)(embedded, by_row, learnt, key, memory)
