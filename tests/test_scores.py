"""Score matrices against a naive loop, hand-computed numbers and each other."""

import functools
import math

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from ntxr import scores


def naive_alignment(x, x_lengths, y, y_lengths):
  """S[i, j] by explicit loops over valid frames and words, in float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  out = np.zeros((len(x), len(y)))
  for i in range(len(x)):
    for j in range(len(y)):
      pairs = [max(0.0, x[i, t] @ y[j, w])
               for t in range(x_lengths[i]) for w in range(y_lengths[j])]
      out[i, j] = np.mean(pairs) if pairs else 0.0
  return out


def ragged(key, n, t, e, lengths):
  x = jax.random.normal(key, (n, t, e))
  mask = jnp.arange(t)[None, :] < jnp.asarray(lengths)[:, None]
  return x, mask


@pytest.fixture
def batch():
  a_len, t_len = [7, 3, 5, 1, 7, 2], [4, 2, 3, 1, 4, 4]
  audio, audio_mask = ragged(jax.random.PRNGKey(0), 6, 7, 5, a_len)
  text, text_mask = ragged(jax.random.PRNGKey(1), 6, 4, 5, t_len)
  return audio, audio_mask, a_len, text, text_mask, t_len


def test_hand_computed_score():
  # Frames (1, 0) and (0, 1); words (1, 1) and (-1, 0): products 1, -1, 1, 0.
  x = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
  y = jnp.array([[[1.0, 1.0], [-1.0, 0.0]]])
  np.testing.assert_allclose(scores.alignment_scores(x, y), [[0.5]])
  # Masking the second word leaves products 1 and 1.
  np.testing.assert_allclose(
      scores.alignment_scores(x, y, y_mask=jnp.array([[True, False]])), [[1.0]])


def test_alignment_matches_naive_loop_with_masks(batch):
  audio, audio_mask, a_len, text, text_mask, t_len = batch
  expected = naive_alignment(audio, a_len, text, t_len)
  got = jax.jit(scores.alignment_scores)(audio, text, audio_mask, text_mask)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_padding_does_not_change_scores(batch):
  audio, audio_mask, _, text, text_mask, _ = batch
  padded_audio = jnp.pad(audio, ((0, 0), (0, 9), (0, 0)), constant_values=5.0)
  padded_mask = jnp.pad(audio_mask, ((0, 0), (0, 9)))
  np.testing.assert_allclose(
      scores.alignment_scores(padded_audio, text, padded_mask, text_mask),
      scores.alignment_scores(audio, text, audio_mask, text_mask), rtol=1e-6)


# 1,008 products: 500 tiles them (blocks of 2 x rows against all of y), 10_000 is one tile;
# 140 and 840 leave a short last block (140: captions in blocks of 5, one left over; 840:
# rows in blocks of 5, one left over).
@pytest.mark.parametrize("tiling", scores.TILINGS)
@pytest.mark.parametrize("tile_elements", [1, 30, 140, 200, 500, 840, 10_000])
def test_tiling_matches_one_shot(batch, tile_elements, tiling):
  audio, audio_mask, _, text, text_mask, _ = batch
  one_shot = scores.alignment_scores(audio, text, audio_mask, text_mask)
  tiled = scores.alignment_scores(audio, text, audio_mask, text_mask,
                                  tile_elements=tile_elements, tiling=tiling)
  np.testing.assert_allclose(tiled, one_shot, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("tiling", scores.TILINGS)
def test_tiled_gradient_matches_one_shot(batch, tiling):
  audio, audio_mask, _, text, text_mask, _ = batch
  def total(a, tile_elements):
    s = scores.alignment_scores(a, text, audio_mask, text_mask,
                                tile_elements=tile_elements, tiling=tiling)
    return jnp.sum(s * jnp.arange(s.size).reshape(s.shape))
  np.testing.assert_allclose(jax.grad(total)(audio, 30),
                             jax.grad(total)(audio, 1 << 20), rtol=1e-5, atol=1e-6)


def test_the_backend_picks_the_tiling():
  assert jax.default_backend() == "cpu" and scores.tiling_for(None) == "rows"
  assert scores.tiling_for("blocks") == "blocks"
  with pytest.raises(ValueError, match="unknown tiling 'tiles'; choose from"):
    scores.tiling_for("tiles")


# Each clip's row costs 12 words x 7 frames = 84 products: 1 and 84 take rows one at a
# time, 340 four together (the last block padded), 10_000 all six.
@pytest.mark.parametrize("tiling", scores.TILINGS)
@pytest.mark.parametrize("tile_elements", [1, 84, 340, 10_000])
def test_sums_over_a_flat_list_of_words_are_the_pairs_sums(batch, tile_elements, tiling):
  audio, audio_mask, a_len, text, text_mask, t_len = batch
  words = np.concatenate([np.asarray(text[j, :n]) for j, n in enumerate(t_len[:4])])
  words = np.pad(words, [(0, 12 - len(words)), (0, 0)])  # zero rows pad the list
  owner = np.pad(np.repeat(np.arange(4), t_len[:4]), (0, 12 - sum(t_len[:4])))
  sums = scores.alignment_sums_over_words(audio, audio_mask, jnp.asarray(words),
                                          jnp.asarray(owner, jnp.int32), captions=4,
                                          tile_elements=tile_elements, tiling=tiling)
  pairs = np.array(a_len)[:, None] * np.array(t_len[:4])[None, :]
  np.testing.assert_allclose(sums, naive_alignment(audio, a_len, text[:4], t_len[:4]) * pairs,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile_elements", [49, 200, 1 << 20])
def test_symmetric_matches_full_and_is_symmetric(batch, tile_elements):
  audio, audio_mask, a_len, *_ = batch
  got = scores.symmetric_alignment_scores(audio, audio_mask, tile_elements=tile_elements)
  np.testing.assert_allclose(got, naive_alignment(audio, a_len, audio, a_len),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got, got.T)


def test_paired_is_the_diagonal(batch):
  audio, audio_mask, _, text, text_mask, _ = batch
  np.testing.assert_allclose(
      scores.paired_alignment_scores(audio, text, audio_mask, text_mask),
      np.diag(scores.alignment_scores(audio, text, audio_mask, text_mask)), rtol=1e-6)


def test_pooled_scores_are_cosines_of_masked_means(batch):
  audio, audio_mask, a_len, text, text_mask, t_len = batch
  def pooled(x, lengths):
    means = np.stack([np.asarray(x[i, :n]).mean(0) for i, n in enumerate(lengths)])
    return means / np.linalg.norm(means, axis=1, keepdims=True)
  expected = pooled(audio, a_len) @ pooled(text, t_len).T
  np.testing.assert_allclose(scores.pooled_scores(audio, text, audio_mask, text_mask),
                             expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      scores.paired_pooled_scores(audio, text, audio_mask, text_mask),
      np.diag(expected), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scores.get_scorer("pooled").symmetric(audio, audio_mask),
                             pooled(audio, a_len) @ pooled(audio, a_len).T, rtol=1e-5,
                             atol=1e-6)  # within a modality, padding left out too


def test_fully_masked_sequence_scores_zero_without_nan(batch):
  audio, audio_mask, _, text, text_mask, _ = batch
  audio_mask = audio_mask.at[2].set(False)
  s, grad = jax.value_and_grad(
      lambda a: scores.alignment_scores(a, text, audio_mask, text_mask).sum())(audio)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(
      scores.alignment_scores(audio, text, audio_mask, text_mask)[2], 0.0)
  np.testing.assert_array_equal(scores.pooled_scores(audio, text, audio_mask)[2], 0.0)


@pytest.mark.parametrize("tile_elements", [30, scores.DEFAULT_TILE_ELEMENTS])
def test_bfloat16_scores_are_float32_scores_of_the_rounded_inputs(batch, tile_elements):
  """bfloat16 embeddings are multiplied exactly and accumulated in float32: every scorer
  gives, in float32, what float32 gives on the same values (the inputs rounded to
  bfloat16 first)."""
  audio, audio_mask, _, text, text_mask, _ = batch
  audio16, text16 = audio.astype(jnp.bfloat16), text.astype(jnp.bfloat16)
  rounded = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
  for scorer, arguments in [
      (scores.alignment_scores, (audio_mask, text_mask)),
      (scores.paired_alignment_scores, (audio_mask, text_mask)),
      (scores.pooled_scores, (audio_mask, text_mask)),
      (scores.paired_pooled_scores, (audio_mask, text_mask))]:
    kwargs = dict(tile_elements=tile_elements) if scorer is scores.alignment_scores else {}
    found = scorer(audio16, text16, *arguments, **kwargs)
    assert found.dtype == jnp.float32
    np.testing.assert_allclose(found, scorer(rounded(audio), rounded(text), *arguments, **kwargs),
                               rtol=1e-5, atol=1e-6)
  found = scores.symmetric_alignment_scores(audio16, audio_mask, tile_elements=tile_elements)
  assert found.dtype == jnp.float32
  np.testing.assert_allclose(
      found, scores.symmetric_alignment_scores(rounded(audio), audio_mask,
                                               tile_elements=tile_elements),
      rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda: scores.alignment_scores(jnp.ones((2, 3)), jnp.ones((2, 3, 4))), r"\[N, T, E\]"),
    (lambda: scores.alignment_scores(jnp.ones((2, 3, 4), jnp.int32), jnp.ones((2, 3, 4))),
     "floating"),
    (lambda: scores.alignment_scores(jnp.ones((2, 3, 4)), jnp.ones((2, 3, 5))),
     "embedding sizes"),
    (lambda: scores.alignment_scores(jnp.ones((2, 3, 4)), jnp.ones((2, 3, 4)),
                                     x_mask=jnp.ones((2, 4), bool)), "mask must have shape"),
    (lambda: scores.alignment_scores(jnp.ones((2, 3, 4)), jnp.ones((2, 3, 4)),
                                     x_mask=jnp.ones((2, 3))), "boolean"),
    (lambda: scores.paired_alignment_scores(jnp.ones((2, 3, 4)), jnp.ones((3, 3, 4))),
     "paired shapes"),
    (lambda: scores.get_scorer("cosine"), "unknown score"),
])
def test_bad_inputs_raise(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_audio_audio_memory_is_bounded_at_paper_scale():
  """N=256, T=1500 audio-audio: the compiled program's scratch stays near one tile."""
  audio = jax.ShapeDtypeStruct((256, 1500, 300), jnp.float32)
  mask = jax.ShapeDtypeStruct((256, 1500), jnp.bool_)
  compiled = jax.jit(scores.symmetric_alignment_scores).lower(audio, mask).compile()
  tile_bytes = 4 * scores.DEFAULT_TILE_ELEMENTS
  all_products_bytes = 4 * (256 * 1500) ** 2
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 4 * tile_bytes + 2 * 256 * 1500 * 300 * 4, temp
  assert temp < all_products_bytes / 1000


def largest_product(fn, *args) -> int:
  """The most elements one matrix product (dot_general) of fn(*args) outputs, in its
  traced program and every loop body in it."""
  most = 0
  def walk(jaxpr):
    nonlocal most
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        most = max(most, math.prod(eqn.outvars[0].aval.shape))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else [param]:
          if isinstance(sub, (jax_core.ClosedJaxpr, jax_core.Jaxpr)):
            walk(getattr(sub, "jaxpr", sub))
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return most


@pytest.mark.parametrize("tile_elements", [1, 500, 2000, 10_000, 10**7])
@pytest.mark.parametrize("tiling", ["rows", "blocks"])
def test_no_product_block_exceeds_the_tile(tile_elements, tiling):
  """Frame-word and frame-frame products come in blocks of at most `tile_elements` that
  fill it near enough (one clip's frames against one caption's words, or another clip's
  frames, at the least), forward and backward; a tile that holds them all takes them in
  one block. (The compiled
  program's memory on a CPU hardly shows this: XLA fuses each block into its max.)"""
  n, t, w, e = 12, 40, 9, 8
  audio, text = jnp.ones((n, t, e)), jnp.ones((n, w, e))
  audio_mask, text_mask = jnp.ones((n, t), bool), jnp.ones((n, w), bool)
  cross = functools.partial(scores.alignment_scores, tile_elements=tile_elements,
                            tiling=tiling)
  def gradient(audio, text):
    return jax.grad(lambda a, x: cross(a, x, audio_mask, text_mask).sum(), (0, 1))(audio, text)
  within = functools.partial(scores.symmetric_alignment_scores, tile_elements=tile_elements)
  for largest, least, every in (
      (largest_product(cross, audio, text, audio_mask, text_mask), t * w, n * t * n * w),
      (largest_product(gradient, audio, text), t * w, n * t * n * w),
      (largest_product(within, audio, audio_mask), t * t, n * t * n * t)):
    if tile_elements < least:  # one clip against one caption or clip
      assert largest == least
    elif tile_elements < every:  # blocks that fill the tile, near enough
      assert tile_elements / 8 < largest <= tile_elements
    else:
      assert largest == every


@pytest.mark.parametrize("paired, matrix", [
    (scores.paired_alignment_scores, scores.alignment_scores),
    (scores.paired_pooled_scores, scores.pooled_scores)])
def test_paired_candidates_pick_matrix_entries(batch, paired, matrix):
  audio, audio_mask, _, text, text_mask, _ = batch
  choice = jnp.array([[0, 5], [3, 1], [2, 2], [4, 0], [1, 3], [5, 4]])
  got = paired(audio, text[choice], audio_mask, text_mask[choice])
  full = matrix(audio, text, audio_mask, text_mask)
  np.testing.assert_allclose(got, full[jnp.arange(6)[:, None], choice], rtol=1e-5)
