"""Sampling kernels and the triplet loss against a naive per-anchor loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntxr import sampling, scores

SINGLE = [s for s in sampling.STRATEGIES if s not in ("full_batch", "random")]
MARGIN = 0.5


def naive_loss(s_cross, audio_ids, strategy, s_audio=None, s_text=None):
  """The strategies' semantics (ntxr/sampling.py's docstring and the README's table), one
  anchor at a time in float64.

  Returns (loss, audio_negatives, text_negatives), negatives -1 where the pool is empty.
  Python's min/max return the first best item of the ascending pool: ties go low.
  """
  s_cross = np.asarray(s_cross, np.float64)
  n = len(audio_ids)
  total, audio_negs, text_negs = 0.0, [], []
  for i in range(n):
    pool = [j for j in range(n) if audio_ids[j] != audio_ids[i]]
    positive = s_cross[i, i]
    if not pool:
      audio_negs.append(-1)
      text_negs.append(-1)
      continue
    if strategy == "full_batch":
      total += np.mean([max(0.0, s_cross[j, i] - positive + MARGIN) for j in pool])
      total += np.mean([max(0.0, s_cross[i, j] - positive + MARGIN) for j in pool])
      continue
    if strategy == "semihard_cross":
      a = min(pool, key=lambda j: abs(s_cross[j, i] - positive))
      t = min(pool, key=lambda j: abs(s_cross[i, j] - positive))
    elif strategy == "hard_cross":
      a = max(pool, key=lambda j: s_cross[j, i])
      t = max(pool, key=lambda j: s_cross[i, j])
    else:
      within = {"text": s_text, "audio": s_audio}[strategy.split("_")[1]]
      pick = min if strategy.startswith("easy") else max
      a = t = pick(pool, key=lambda j: within[i, j])
    audio_negs.append(a)
    text_negs.append(t)
    total += max(0.0, s_cross[a, i] - positive + MARGIN)
    total += max(0.0, s_cross[i, t] - positive + MARGIN)
  return total / n, audio_negs, text_negs


@pytest.fixture
def batch():
  """8 pairs from 5 clips with ragged masks, and their three score matrices.

  Captions of one clip share its audio and frames, so their scores tie exactly.
  """
  audio = jax.random.normal(jax.random.PRNGKey(0), (8, 9, 6))
  text = jax.random.normal(jax.random.PRNGKey(1), (8, 5, 6))
  audio_mask = jnp.arange(9)[None] < jnp.array([9, 9, 4, 7, 7, 2, 9, 5])[:, None]
  text_mask = jnp.arange(5)[None] < jnp.array([5, 3, 4, 1, 5, 2, 5, 3])[:, None]
  audio_ids = jnp.array([0, 0, 1, 2, 2, 2, 3, 4])
  audio_mask = audio_mask.at[1].set(audio_mask[0])  # the same clip, the same frames
  audio = audio.at[1].set(audio[0]).at[4].set(audio[3]).at[5].set(audio[3])
  audio_mask = audio_mask.at[4].set(audio_mask[3]).at[5].set(audio_mask[3])
  return dict(
      audio=audio, text=text, audio_mask=audio_mask, text_mask=text_mask,
      audio_ids=audio_ids,
      s_cross=scores.alignment_scores(audio, text, audio_mask, text_mask),
      s_audio=scores.alignment_scores(audio, audio, audio_mask, audio_mask),
      s_text=scores.alignment_scores(text, text, text_mask, text_mask))


def matrices(b):
  return dict(s_audio=b["s_audio"], s_text=b["s_text"])


@pytest.mark.parametrize("strategy", SINGLE)
def test_selection_and_loss_match_naive_loop(batch, strategy):
  expected_loss, audio_negs, text_negs = naive_loss(
      batch["s_cross"], list(batch["audio_ids"]), strategy,
      np.asarray(batch["s_audio"]), np.asarray(batch["s_text"]))
  select = jax.jit(functools.partial(sampling.select_negatives, strategy=strategy))
  audio_neg, text_neg = select(batch["s_cross"], batch["audio_ids"], **matrices(batch))
  assert audio_neg.dtype == jnp.int32 and text_neg.dtype == jnp.int32
  np.testing.assert_array_equal(audio_neg, audio_negs)
  np.testing.assert_array_equal(text_neg, text_negs)
  loss = jax.jit(functools.partial(sampling.triplet_loss, strategy=strategy))(
      batch["s_cross"], batch["audio_ids"], **matrices(batch))
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)


def test_full_batch_matches_naive_loop(batch):
  expected, *_ = naive_loss(batch["s_cross"], list(batch["audio_ids"]), "full_batch")
  loss = sampling.triplet_loss(batch["s_cross"], batch["audio_ids"], strategy="full_batch")
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  with pytest.raises(ValueError, match="every pool member"):
    sampling.select_negatives(batch["s_cross"], batch["audio_ids"], strategy="full_batch")


def test_hand_computed_semihard_may_pick_above_the_positive():
  # Text anchor 0 (positive 0.5): audio candidates 0.9 (|0.4|) and 0.3 (|0.2|) -> j=2.
  # Audio anchor 0: texts 0.6 (|0.1|) and 0.0 -> j=1, a negative above the positive.
  s = jnp.array([[0.5, 0.6, 0.0],
                 [0.9, 0.7, 0.1],
                 [0.3, 0.2, 0.8]])
  audio_neg, text_neg = sampling.select_negatives(s, jnp.array([0, 1, 2]),
                                                  strategy="semihard_cross")
  assert int(audio_neg[0]) == 2 and int(text_neg[0]) == 1
  # Anchor 0 hinges: 0.3 - 0.5 + 0.5 = 0.3 and 0.6 - 0.5 + 0.5 = 0.6.
  per_anchor_0 = 0.3 + 0.6
  expected, *_ = naive_loss(s, [0, 1, 2], "semihard_cross")
  loss = sampling.triplet_loss(s, jnp.array([0, 1, 2]), strategy="semihard_cross")
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert expected > per_anchor_0 / 3


def test_ties_go_to_the_lowest_index():
  s = jnp.array([[0.5, 0.7, 0.7, 0.7]] * 4)
  audio_neg, text_neg = sampling.select_negatives(
      s, jnp.array([0, 1, 2, 3]), strategy="hard_text", s_text=jnp.ones((4, 4)))
  np.testing.assert_array_equal(audio_neg, [1, 0, 0, 0])
  _, text_neg = sampling.select_negatives(s, jnp.array([0, 1, 2, 3]), strategy="hard_cross")
  np.testing.assert_array_equal(text_neg, [1, 2, 1, 1])


def test_random_covers_the_pool_uniformly_and_never_a_positive(batch):
  ids = batch["audio_ids"]
  select = jax.jit(jax.vmap(
      lambda key: sampling.select_negatives(None, ids, strategy="random", key=key)))
  audio_neg, text_neg = select(jax.random.split(jax.random.PRNGKey(3), 4000))
  ids = np.asarray(ids)
  for negatives in (np.asarray(audio_neg), np.asarray(text_neg)):
    for i in range(len(ids)):
      pool = np.flatnonzero(ids != ids[i])
      drawn = negatives[:, i]
      assert set(drawn) == set(pool)
      counts = np.bincount(drawn, minlength=len(ids))[pool]
      assert counts.min() > 0.7 * counts.mean()  # ~4000/6 each; 0.7 is > 7 sigma
  assert np.mean(np.asarray(audio_neg) == np.asarray(text_neg)) < 0.5  # independent


def test_one_clip_batch_and_empty_pools_contribute_zero(batch):
  ids = jnp.zeros(8, jnp.int32)
  for strategy in sampling.STRATEGIES:
    loss, grad = jax.value_and_grad(
        lambda a: sampling.triplet_loss_from_embeddings(
            a, batch["text"], ids, strategy=strategy, key=jax.random.PRNGKey(0),
            audio_mask=batch["audio_mask"], text_mask=batch["text_mask"]))(batch["audio"])
    assert float(loss) == 0.0, strategy
    assert np.all(np.asarray(grad) == 0.0), strategy
  np.testing.assert_array_equal(
      sampling.select_negatives(batch["s_cross"], ids, strategy="hard_cross")[0], -1)


@pytest.mark.parametrize("strategy", sorted(sampling.STRATEGIES))
def test_from_embeddings_equals_loss_on_full_matrices(batch, strategy):
  key = jax.random.PRNGKey(7)
  masks = dict(audio_mask=batch["audio_mask"], text_mask=batch["text_mask"])

  def from_matrices(audio, text):
    return sampling.triplet_loss(
        scores.alignment_scores(audio, text, batch["audio_mask"], batch["text_mask"]),
        batch["audio_ids"], strategy=strategy, key=key,
        s_audio=scores.alignment_scores(audio, audio, batch["audio_mask"],
                                        batch["audio_mask"]),
        s_text=scores.alignment_scores(text, text, batch["text_mask"],
                                       batch["text_mask"]))

  def from_embeddings(audio, text):
    return sampling.triplet_loss_from_embeddings(
        audio, text, batch["audio_ids"], strategy=strategy, key=key, **masks)

  args = (batch["audio"], batch["text"])
  value, grads = jax.value_and_grad(from_matrices, argnums=(0, 1))(*args)
  value_e, grads_e = jax.jit(jax.value_and_grad(from_embeddings, argnums=(0, 1)))(*args)
  assert float(value) > 0
  np.testing.assert_allclose(value_e, value, rtol=1e-5)
  for g, g_e in zip(grads, grads_e):
    assert np.abs(np.asarray(g)).sum() > 0
    np.testing.assert_allclose(g_e, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strategy", ["full_batch", "semihard_cross", "hard_audio", "random"])
def test_gradient_matches_finite_differences(batch, strategy):
  with jax.enable_x64(True):
    audio = jnp.asarray(batch["audio"], jnp.float64)
    text = jnp.asarray(batch["text"], jnp.float64)
    loss = lambda a, t: sampling.triplet_loss_from_embeddings(
        a, t, batch["audio_ids"], strategy=strategy, key=jax.random.PRNGKey(1),
        audio_mask=batch["audio_mask"], text_mask=batch["text_mask"])
    grad_a, grad_t = jax.grad(loss, argnums=(0, 1))(audio, text)
    for seed in range(3):
      ka, kt = jax.random.split(jax.random.PRNGKey(seed))
      # The rows of one clip hold the same audio, so they move together: an
      # independent nudge would break their exact ties and jump to another negative.
      va = jax.random.normal(ka, audio.shape, jnp.float64)[batch["audio_ids"]]
      vt = jax.random.normal(kt, text.shape, jnp.float64)
      h = 1e-6
      numeric = (loss(audio + h * va, text + h * vt)
                 - loss(audio - h * va, text - h * vt)) / (2 * h)
      analytic = jnp.sum(grad_a * va) + jnp.sum(grad_t * vt)
      np.testing.assert_allclose(numeric, analytic, rtol=1e-5, atol=1e-8)


def test_vmap_over_batches_equals_one_at_a_time(batch):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  audio = jnp.stack([batch["audio"], batch["audio"] * 0.5, batch["audio"][::-1]])
  loss = lambda a, k: sampling.triplet_loss_from_embeddings(
      a, batch["text"], batch["audio_ids"], strategy="random", key=k,
      audio_mask=batch["audio_mask"], text_mask=batch["text_mask"])
  batched = jax.jit(jax.vmap(loss))(audio, keys)
  np.testing.assert_allclose(batched, [loss(a, k) for a, k in zip(audio, keys)], rtol=1e-6)


@pytest.mark.parametrize("strategy", sorted(sampling.STRATEGIES))
def test_bfloat16_runs_and_tracks_float32(batch, strategy):
  key = jax.random.PRNGKey(0)
  loss = lambda a, t: sampling.triplet_loss_from_embeddings(
      a, t, batch["audio_ids"], strategy=strategy, key=key,
      audio_mask=batch["audio_mask"], text_mask=batch["text_mask"])
  l32 = loss(batch["audio"], batch["text"])
  l16, g16 = jax.value_and_grad(loss)(batch["audio"].astype(jnp.bfloat16),
                                      batch["text"].astype(jnp.bfloat16))
  assert g16.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g16, np.float32)))
  # bfloat16 may pick another near-tied negative; the loss stays on the same scale.
  np.testing.assert_allclose(float(l16), float(l32), rtol=0.1)


def test_compiles_once_per_shape(batch):
  traces = []

  @jax.jit
  def step(audio, text, ids, key):
    traces.append(1)
    return sampling.triplet_loss_from_embeddings(
        audio, text, ids, strategy="semihard_cross", key=key,
        audio_mask=batch["audio_mask"], text_mask=batch["text_mask"])

  step(batch["audio"], batch["text"], batch["audio_ids"], jax.random.PRNGKey(0))
  step(batch["audio"] + 1, batch["text"] * 2, batch["audio_ids"][::-1],
       jax.random.PRNGKey(1))
  assert len(traces) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="hardest"), "unknown strategy"),
    (dict(strategy="easy_text"), "needs s_text"),
    (dict(strategy="hard_audio", s_audio=jnp.ones((3, 3))), r"s_audio must have shape \(8, 8\)"),
    (dict(strategy="random"), "pass key="),
])
def test_bad_arguments_raise(batch, kwargs, message):
  with pytest.raises(ValueError, match=message):
    sampling.triplet_loss(batch["s_cross"], batch["audio_ids"], **kwargs)


def test_bad_inputs_raise(batch):
  with pytest.raises(ValueError, match="floating"):
    sampling.triplet_loss(jnp.ones((8, 8), jnp.int32), batch["audio_ids"],
                          strategy="hard_cross")
  with pytest.raises(ValueError, match="integer vector"):
    sampling.triplet_loss(batch["s_cross"], jnp.zeros(8), strategy="hard_cross")
  with pytest.raises(ValueError, match=r"s_cross must have shape \(8, 8\)"):
    sampling.triplet_loss(batch["s_cross"][:, :7], batch["audio_ids"], strategy="hard_cross")
  with pytest.raises(ValueError, match="must match audio_ids"):
    sampling.triplet_loss_from_embeddings(batch["audio"][:7], batch["text"],
                                          batch["audio_ids"], strategy="hard_cross")


@pytest.mark.parametrize("strategy", ["hard_cross", "easy_text", "full_batch"])
def test_terms_report_the_scores_the_loss_used(batch, strategy):
  masks = dict(audio_mask=batch["audio_mask"], text_mask=batch["text_mask"])
  loss, terms = sampling.triplet_loss_and_terms(
      batch["audio"], batch["text"], batch["audio_ids"], strategy=strategy, **masks)
  s = np.asarray(batch["s_cross"])
  np.testing.assert_allclose(terms.positive, np.diagonal(s), rtol=1e-5)
  pool = np.asarray(sampling.negative_pool(batch["audio_ids"]))
  if strategy == "full_batch":
    expected = np.stack([(s.T * pool).sum(1), (s * pool).sum(1)], 1) / pool.sum(1)[:, None]
  else:
    audio_neg, text_neg = (np.asarray(x) for x in sampling.select_negatives(
        s, batch["audio_ids"], strategy=strategy, s_text=batch["s_text"]))
    expected = np.stack([s[audio_neg, np.arange(len(s))], s[np.arange(len(s)), text_neg]], 1)
    hinge = np.maximum(expected - np.diagonal(s)[:, None] + 0.5, 0).sum(1).mean()
    np.testing.assert_allclose(loss, hinge, rtol=1e-5)
  np.testing.assert_allclose(terms.negative, expected, rtol=1e-5)
  np.testing.assert_array_equal(terms.valid, pool.any(1))


def test_a_strategy_name_is_registered_once():
  with pytest.raises(ValueError, match="'hard_cross' is registered already"):
    sampling.register("hard_cross", needs="cross")(lambda s, pool, key: (None, None))
  assert sampling.STRATEGIES["hard_cross"].select.__name__ == "_hard_cross"
