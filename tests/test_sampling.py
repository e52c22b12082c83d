"""Sampling kernels and the triplet loss against a naive per-anchor loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntxr import sampling, scores, specs
from ntxr.bench import reference

SINGLE = [s for s in sampling.STRATEGIES if s not in ("full_batch", "random")]
MARGIN = 0.5


def masked_score(ops):
  """The alignment score for the reference loop in `ops`' arrays: padded steps are zero
  vectors (`zeroed`), so the mean runs over the non-zero rows of each side."""
  def valid(z):
    count = (abs(z).sum(-1) > 0).sum(-1)
    return count + (count == 0)
  return lambda x, y: (ops.relu(x @ ops.transpose_last_two(y)).sum(axis=(-2, -1))
                       / (valid(x) * valid(y)))


def masked_pooled_score(ops):
  """The pooled score for the reference loop: the cosine of the means of each side's
  non-zero rows (padded steps are zero vectors, `zeroed`)."""
  del ops  # plain arithmetic serves NumPy and JAX alike
  def unit_mean(z):
    count = (abs(z).sum(-1) > 0).sum(-1)
    mean = z.sum(-2) / (count + (count == 0))[..., None]
    norm = (mean * mean).sum(-1, keepdims=True) ** 0.5
    return mean / (norm + (norm == 0))
  return lambda x, y: (unit_mean(x) * unit_mean(y)).sum(-1)


def zeroed(b):
  """The batch's audio and text in float64 with padded steps set to zero."""
  return (np.where(np.asarray(b["audio_mask"])[..., None], np.asarray(b["audio"], np.float64), 0),
          np.where(np.asarray(b["text_mask"])[..., None], np.asarray(b["text"], np.float64), 0))


def reference_loss(b, strategy, audio_ids=None, kept=None):
  """(loss, audio negatives, text negatives) of the per-anchor reference loop."""
  ids = list(np.asarray(b["audio_ids"] if audio_ids is None else audio_ids))
  return reference.per_anchor_loss(reference.NUMPY_OPS, *zeroed(b), ids, strategy, MARGIN,
                                   np.random.default_rng(0),
                                   score=masked_score(reference.NUMPY_OPS),
                                   kept=None if kept is None else kept.tolist())


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
def test_selection_and_loss_match_the_reference_loop(batch, strategy):
  expected_loss, audio_negs, text_negs = reference_loss(batch, strategy)
  select = jax.jit(functools.partial(sampling.select_negatives, strategy=strategy))
  chosen = select(batch["s_cross"], batch["audio_ids"], **matrices(batch))
  assert chosen.audio.dtype == jnp.int32 and chosen.audio.shape == (8, 1)
  np.testing.assert_array_equal(chosen.audio[:, 0], audio_negs)
  np.testing.assert_array_equal(chosen.text[:, 0], text_negs)
  loss = jax.jit(functools.partial(sampling.triplet_loss, strategy=strategy))(
      batch["audio"], batch["text"], batch["audio_ids"], audio_mask=batch["audio_mask"],
      text_mask=batch["text_mask"])
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)


@pytest.mark.parametrize("strategy", [*SINGLE, "full_batch"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_filtered_pool_matches_the_reference_loop_given_that_pool(batch, strategy, seed):
  """A random share of each pool filtered away, anchor 3's whole pool among it."""
  kept = np.random.default_rng(seed).uniform(size=(8, 8)) > 0.4
  kept[3] = False
  expected_loss, audio_negs, text_negs = reference_loss(batch, strategy, kept=kept)
  assert audio_negs[3] is None and text_negs[3] is None
  pool = sampling.negative_pool(batch["audio_ids"]) & jnp.asarray(kept)
  loss, terms = jax.jit(functools.partial(sampling.triplet_loss_and_terms, strategy=strategy))(
      batch["audio"], batch["text"], batch["audio_ids"], audio_mask=batch["audio_mask"],
      text_mask=batch["text_mask"], pool=pool)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  assert not terms.valid[3] and not np.asarray(terms.weights[:, 3]).any()
  if strategy != "full_batch":
    chosen = np.asarray(terms.weights).argmax(axis=-1)  # one negative each: weight 1
    valid = [i for i in range(8) if audio_negs[i] is not None]
    np.testing.assert_array_equal(chosen[0, valid], [audio_negs[i] for i in valid])
    np.testing.assert_array_equal(chosen[1, valid], [text_negs[i] for i in valid])


def test_full_batch_matches_the_reference_loop(batch):
  expected, *_ = reference_loss(batch, "full_batch")
  loss = sampling.triplet_loss(batch["audio"], batch["text"], batch["audio_ids"],
                               strategy="full_batch", audio_mask=batch["audio_mask"],
                               text_mask=batch["text_mask"])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  chosen = sampling.select_negatives(None, batch["audio_ids"], strategy="full_batch")
  ids = [0, 0, 1, 2, 2, 2, 3, 4]  # the batch's clips: every caption of another is a negative
  np.testing.assert_array_equal(chosen.valid, [[a != b for b in ids] for a in ids])


def test_hand_computed_semihard_may_pick_above_the_positive():
  # Text anchor 0 (positive 0.5): audio candidates 0.9 (|0.4|) and 0.3 (|0.2|) -> j=2.
  # Audio anchor 0: texts 0.6 (|0.1|) and 0.0 -> j=1, a negative above the positive.
  s = jnp.array([[0.5, 0.6, 0.0],
                 [0.9, 0.7, 0.1],
                 [0.3, 0.2, 0.8]])
  chosen = sampling.select_negatives(s, jnp.array([0, 1, 2]), strategy="semihard_cross")
  assert int(chosen.audio[0, 0]) == 2 and int(chosen.text[0, 0]) == 1
  assert chosen.valid.all()


def test_ties_go_to_the_lowest_index():
  s = jnp.array([[0.5, 0.7, 0.7, 0.7]] * 4)
  chosen = sampling.select_negatives(
      s, jnp.array([0, 1, 2, 3]), strategy="hard_text", s_text=jnp.ones((4, 4)))
  np.testing.assert_array_equal(chosen.audio[:, 0], [1, 0, 0, 0])
  chosen = sampling.select_negatives(s, jnp.array([0, 1, 2, 3]), strategy="hard_cross")
  np.testing.assert_array_equal(chosen.text[:, 0], [1, 2, 1, 1])


def test_random_covers_the_pool_uniformly_and_never_a_positive(batch):
  ids = batch["audio_ids"]
  select = jax.jit(jax.vmap(
      lambda key: sampling.select_negatives(None, ids, strategy="random", key=key)[:2]))
  audio_neg, text_neg = (x[..., 0] for x in select(jax.random.split(jax.random.PRNGKey(3), 4000)))
  ids = np.asarray(ids)
  for negatives in (np.asarray(audio_neg), np.asarray(text_neg)):
    for i in range(len(ids)):
      pool = np.flatnonzero(ids != ids[i])
      drawn = negatives[:, i]
      assert set(drawn) == set(pool)
      counts = np.bincount(drawn, minlength=len(ids))[pool]
      assert counts.min() > 0.7 * counts.mean()  # ~4000/6 each; 0.7 is > 7 sigma
    for i in range(len(ids)):  # each anchor draws apart from the others
      for j in range(i + 1, len(ids)):
        shared = np.sum((ids != ids[i]) & (ids != ids[j]))
        expected = shared / np.sum(ids != ids[i]) / np.sum(ids != ids[j])
        same = np.mean(negatives[:, i] == negatives[:, j])
        assert abs(same - expected) < 0.05, (i, j, same, expected)  # >= 7.9 sigma
  assert np.mean(np.asarray(audio_neg) == np.asarray(text_neg)) < 0.5  # independent


def test_one_clip_batch_and_empty_pools_contribute_zero(batch):
  ids = jnp.zeros(8, jnp.int32)
  for strategy in sampling.STRATEGIES:
    loss, grad = jax.jit(jax.value_and_grad(
        lambda a: sampling.triplet_loss(
            a, batch["text"], ids, strategy=strategy, key=jax.random.PRNGKey(0),
            audio_mask=batch["audio_mask"], text_mask=batch["text_mask"])))(batch["audio"])
    assert float(loss) == 0.0, strategy
    assert np.all(np.asarray(grad) == 0.0), strategy
  chosen = sampling.select_negatives(batch["s_cross"], ids, strategy="hard_cross")
  np.testing.assert_array_equal(chosen.audio, -1)
  assert not chosen.valid.any()


@pytest.mark.parametrize("score_name, reference_score", [
    ("alignment", masked_score), ("pooled", masked_pooled_score)])
@pytest.mark.parametrize("strategy", sorted(set(sampling.STRATEGIES) - {"random"}))
def test_loss_and_gradients_equal_the_reference_loop_in_jax(batch, strategy, score_name,
                                                            reference_score):
  # Padded steps zeroed and a masked mean, so the eager loop scores as the kernel does.
  audio, text = (jnp.asarray(x, jnp.float32) for x in zeroed(batch))
  score = reference_score(reference.JAX_OPS)
  ids = list(np.asarray(batch["audio_ids"]))
  loop = lambda a, t: reference.per_anchor_loss(reference.JAX_OPS, a, t, ids, strategy,
                                                MARGIN, None, score=score)[0]
  kernel = lambda a, t: sampling.triplet_loss(a, t, batch["audio_ids"], strategy=strategy,
                                              audio_mask=batch["audio_mask"],
                                              text_mask=batch["text_mask"], score=score_name)
  value, grads = jax.value_and_grad(loop, argnums=(0, 1))(audio, text)
  value_k, grads_k = jax.jit(jax.value_and_grad(kernel, argnums=(0, 1)))(audio, text)
  assert float(value) > 0
  np.testing.assert_allclose(value_k, value, rtol=1e-5)
  # The loop's zeroed padding is an input like any other (its pooled mean passes it a
  # gradient); the kernel's padding is no input at all: compared where the masks hold.
  for g, g_k, mask in zip(grads, grads_k, (batch["audio_mask"], batch["text_mask"])):
    g = np.where(np.asarray(mask)[..., None], g, 0)
    assert np.abs(g).sum() > 0
    np.testing.assert_allclose(g_k, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strategy", ["full_batch", "semihard_cross", "hard_audio", "random"])
def test_gradient_matches_finite_differences(batch, strategy):
  with jax.enable_x64(True):
    audio = jnp.asarray(batch["audio"], jnp.float64)
    text = jnp.asarray(batch["text"], jnp.float64)
    loss = jax.jit(lambda a, t: sampling.triplet_loss(
        a, t, batch["audio_ids"], strategy=strategy, key=jax.random.PRNGKey(1),
        audio_mask=batch["audio_mask"], text_mask=batch["text_mask"]))
    grad_a, grad_t = jax.jit(jax.grad(loss, argnums=(0, 1)))(audio, text)
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
  loss = lambda a, k: sampling.triplet_loss(
      a, batch["text"], batch["audio_ids"], strategy="random", key=k,
      audio_mask=batch["audio_mask"], text_mask=batch["text_mask"])
  batched = jax.jit(jax.vmap(loss))(audio, keys)
  one = jax.jit(loss)
  np.testing.assert_allclose(batched, [one(a, k) for a, k in zip(audio, keys)], rtol=1e-6)


@pytest.mark.parametrize("score", ["alignment", "pooled"])
@pytest.mark.parametrize("strategy", sorted(sampling.STRATEGIES))
def test_bfloat16_gives_float32s_loss_and_gradient_of_the_rounded_inputs(
    batch, strategy, score):
  """bfloat16 embeddings are scored exactly in float32 (test_scores), so the negatives,
  the loss is float32's on the same rounded values; the gradient's products run in
  bfloat16, so it holds float32's to about 1e-2 of its size."""
  key = jax.random.PRNGKey(0)
  loss = lambda a, t: sampling.triplet_loss(
      a, t, batch["audio_ids"], strategy=strategy, key=key, score=score,
      audio_mask=batch["audio_mask"], text_mask=batch["text_mask"])
  audio16, text16 = batch["audio"].astype(jnp.bfloat16), batch["text"].astype(jnp.bfloat16)
  l16, (ga16, gt16) = jax.value_and_grad(loss, argnums=(0, 1))(audio16, text16)
  l32, (ga32, gt32) = jax.value_and_grad(loss, argnums=(0, 1))(
      audio16.astype(jnp.float32), text16.astype(jnp.float32))
  assert l16.dtype == jnp.float32 and ga16.dtype == gt16.dtype == jnp.bfloat16
  np.testing.assert_allclose(float(l16), float(l32), rtol=1e-5)
  for g16, g32 in ((ga16, ga32), (gt16, gt32)):
    g16, g32 = np.asarray(g16, np.float64), np.asarray(g32, np.float64)
    assert np.linalg.norm(g16 - g32) <= 1e-2 * np.linalg.norm(g32)
    np.testing.assert_allclose(g16, g32, rtol=1e-2, atol=2e-2 * np.abs(g32).max())


def test_compiles_once_per_shape(batch):
  traces = []

  @jax.jit
  def step(audio, text, ids, key):
    traces.append(1)
    return sampling.triplet_loss(
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
    sampling.select_negatives(batch["s_cross"], batch["audio_ids"], **kwargs)


def test_bad_inputs_raise(batch):
  with pytest.raises(ValueError, match="floating"):
    sampling.select_negatives(jnp.ones((8, 8), jnp.int32), batch["audio_ids"],
                              strategy="hard_cross")
  with pytest.raises(ValueError, match="integer vector"):
    sampling.triplet_loss(batch["audio"], batch["text"], jnp.zeros(8), strategy="hard_cross")
  with pytest.raises(ValueError, match=r"s_cross must have shape \(8, 8\)"):
    sampling.select_negatives(batch["s_cross"][:, :7], batch["audio_ids"],
                              strategy="hard_cross")
  with pytest.raises(ValueError, match="must match audio_ids"):
    sampling.triplet_loss(batch["audio"][:7], batch["text"],
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
    chosen = sampling.select_negatives(s, batch["audio_ids"], strategy=strategy,
                                       s_text=batch["s_text"])
    audio_neg, text_neg = np.asarray(chosen.audio[:, 0]), np.asarray(chosen.text[:, 0])
    expected = np.stack([s[audio_neg, np.arange(len(s))], s[np.arange(len(s)), text_neg]], 1)
    hinge = np.maximum(expected - np.diagonal(s)[:, None] + 0.5, 0).sum(1).mean()
    np.testing.assert_allclose(loss, hinge, rtol=1e-5)
  np.testing.assert_allclose(terms.negative, expected, rtol=1e-5)
  np.testing.assert_array_equal(terms.valid, pool.any(1))
  if strategy == "full_batch":  # each negative counts 1 / |pool| of its anchor's hinge
    weights = np.stack([pool, pool]) / pool.sum(1)[None, :, None]
  else:  # the one chosen, whole
    weights = np.stack([np.eye(len(s))[audio_neg], np.eye(len(s))[text_neg]])
  np.testing.assert_allclose(terms.weights, weights, rtol=1e-6)


def test_a_strategy_name_is_registered_once():
  with pytest.raises(ValueError, match="'hard_cross' exists already"):
    sampling.register("hard_cross", needs="cross")(lambda s, pool, key: None)
  with pytest.raises(ValueError, match="'hard_cross' is registered already"):
    sampling._specified("hard_cross")(lambda s, pool, key: None)  # pylint: disable=protected-access
  assert sampling.STRATEGIES["hard_cross"].select.__name__ == "_hard_cross"


def test_a_kernel_needs_its_spec_and_a_spec_its_kernel():
  with pytest.raises(ValueError, match="'hardest' is not specified in ntxr/specs.py"):
    sampling._specified("hardest")  # pylint: disable=protected-access
  with pytest.raises(ImportError, match=r"without a kernel: \['hardest'\]"):
    specs.check_registered({**specs.STRATEGIES, "hardest": None}, sampling.STRATEGIES)


def test_a_strategy_registered_at_run_time_trains_from_python(batch, monkeypatch):
  monkeypatch.setattr(specs, "STRATEGIES", dict(specs.STRATEGIES))
  monkeypatch.setattr(sampling, "STRATEGIES", dict(sampling.STRATEGIES))

  @sampling.register("least_cross", needs="cross")
  def least_cross(rows, pool, key):  # pylint: disable=unused-variable,unused-argument
    audio, text = (sampling.masked_argmax(-s, pool) for s in (rows.by_text, rows.by_audio))
    return sampling.Negatives(audio[:, None], text[:, None], (audio >= 0)[:, None])
  assert specs.STRATEGIES["least_cross"].needs == "cross"
  masks = dict(audio_mask=batch["audio_mask"], text_mask=batch["text_mask"])
  loss, terms = sampling.triplet_loss_and_terms(
      batch["audio"], batch["text"], batch["audio_ids"], strategy="least_cross", **masks)
  s, pool = np.asarray(batch["s_cross"]), np.asarray(sampling.negative_pool(batch["audio_ids"]))
  least = lambda m: np.where(pool, m, np.inf).min(axis=1)
  np.testing.assert_allclose(terms.negative, np.stack([least(s.T), least(s)], 1), rtol=1e-5)
  assert float(loss) >= 0
  with pytest.raises(ValueError, match="knows no pick of strategy 'least_cross'"):
    reference_loss(batch, "least_cross")
