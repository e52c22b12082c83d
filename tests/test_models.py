"""The encoders: shapes, normalisation, padding invariance, pooling and upsampling, and
their bfloat16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntxr import models, sampling, steps

SMALL = dict(channels=(4, 8, 8, 8, 8), embed_dim=12)


def crnn_inputs(lengths, frames, seed=0):
  audio = np.random.default_rng(seed).normal(size=(len(lengths), frames, 64))
  mask = np.arange(frames)[None] < np.asarray(lengths)[:, None]
  return jnp.asarray(audio * mask[..., None], jnp.float32), jnp.asarray(mask)


@pytest.fixture(scope="module")
def crnn():
  model = models.CRNN(SMALL["channels"], embed_dim=SMALL["embed_dim"])
  audio, mask = crnn_inputs([37, 80], 80)
  return model, jax.jit(model.init, static_argnames="train")(jax.random.key(0), audio, mask,
                                                              train=False)


def test_frames_are_unit_vectors_and_padding_is_zero(crnn):
  model, variables = crnn
  audio, mask = crnn_inputs([37, 80], 80)
  out = jax.jit(lambda a, m: model.apply(variables, a, m, train=False))(audio, mask)
  assert out.shape == (2, 80, 12)
  norms = np.linalg.norm(np.asarray(out), axis=-1)
  np.testing.assert_allclose(norms[np.asarray(mask)], 1.0, rtol=1e-5)
  assert np.all(norms[~np.asarray(mask)] == 0)


def test_embedding_does_not_depend_on_padding(crnn):
  model, variables = crnn
  audio, mask = crnn_inputs([37, 53], 56)
  padded, padded_mask = (jnp.pad(audio, ((0, 0), (0, 104), (0, 0))),
                         jnp.pad(mask, ((0, 0), (0, 104))))
  embed = jax.jit(lambda a, m: model.apply(variables, a, m, train=False))
  short, long = embed(audio, mask), embed(padded, padded_mask)
  np.testing.assert_allclose(long[:, :56], short, atol=1e-5)
  # Training-mode BatchNorm statistics skip padded frames too, whatever they hold.
  garbage = padded + 100.0 * (~padded_mask)[..., None]
  train_out = jax.jit(lambda a: model.apply(variables, a, padded_mask, train=True,
                                            mutable=["batch_stats"],
                                            rngs={"dropout": jax.random.key(1)}))
  (clean, clean_stats), (dirty, dirty_stats) = train_out(padded), train_out(garbage)
  np.testing.assert_allclose(dirty, clean, atol=1e-5)
  # Dropout draws the same masks for a clip's frames however far its batch is padded.
  unpadded, _ = jax.jit(lambda a, m: model.apply(
      variables, a, m, train=True, mutable=["batch_stats"],
      rngs={"dropout": jax.random.key(1)}))(audio, mask)
  np.testing.assert_allclose(clean[:, :56], unpadded, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               clean_stats, dirty_stats)


def test_lp_pool_matches_a_loop():
  x = np.random.default_rng(0).normal(size=(1, 4, 8, 2)).astype(np.float32)
  got = np.asarray(models.lp_pool(jnp.asarray(x), (2, 4)))
  for t in range(2):
    for f in range(2):
      window = x[0, 2 * t:2 * t + 2, 4 * f:4 * f + 4]
      np.testing.assert_allclose(got[0, t, f], (window ** 4).sum(axis=(0, 1)) ** 0.25,
                                 rtol=1e-5)


def test_upsample_linear_matches_interpolation_of_each_row():
  x = np.random.default_rng(0).normal(size=(2, 6, 3)).astype(np.float32)
  lengths = np.array([4, 6])
  got = np.asarray(models.upsample_linear(jnp.asarray(x), jnp.asarray(lengths), 4))
  for row, length in enumerate(lengths):
    # align_corners=False: output step t samples input position (t + 0.5) / 4 - 0.5.
    positions = (np.arange(4 * length) + 0.5) / 4 - 0.5
    for d in range(3):
      expected = np.interp(positions, np.arange(length), x[row, :length, d])
      np.testing.assert_allclose(got[row, :4 * length, d], expected, rtol=1e-5, atol=1e-6)


def pytorch_linear_interpolation(row: np.ndarray, size: int) -> np.ndarray:
  """F.interpolate(mode="linear", align_corners=False, size=size) on [L, D], as PyTorch's
  upsample_linear1d kernel computes it: a source index clamped at 0, its neighbour
  clamped at the last step."""
  scale, out = len(row) / size, np.zeros((size, row.shape[1]))
  for t in range(size):
    source = max(scale * (t + 0.5) - 0.5, 0.0)
    low = int(source)
    high = low + (1 if low < len(row) - 1 else 0)
    weight = source - low
    out[t] = (1 - weight) * row[low] + weight * row[high]
  return out


def test_upsample_linear_to_each_rows_frames_matches_pytorchs_kernel():
  x = np.random.default_rng(1).normal(size=(3, 5, 2)).astype(np.float32)
  frames = np.array([18, 13, 7])  # the authors' CRNN: frames // 4 steps back to frames
  steps_ = frames // 4
  got = np.asarray(models.upsample_linear(jnp.asarray(x), jnp.asarray(steps_), 4,
                                          jnp.asarray(frames)))
  for row in range(3):
    np.testing.assert_allclose(got[row, :frames[row]], pytorch_linear_interpolation(
        x[row, :steps_[row]], frames[row]), rtol=1e-5, atol=1e-6)


def test_pooling_floor_drops_only_a_partial_last_window():
  model = lambda remainder: models.CRNN((2, 4, 4, 4, 4), embed_dim=8, pool_remainder=remainder)
  audio = jnp.asarray(np.random.default_rng(2).normal(size=(2, 24, 64)), jnp.float32)
  mask = jnp.arange(24)[None] < jnp.array([[20], [23]])  # 5 windows of 4; 5 and 3 frames over
  variables = model("keep").init(jax.random.key(0), audio, mask, train=False)
  keep, drop = (np.asarray(model(r).apply(variables, audio, mask, train=False))
                for r in ("keep", "drop"))
  np.testing.assert_array_equal(keep[0], drop[0])  # 20 frames fill their windows
  assert not np.allclose(keep[1, :23], drop[1, :23])  # 23 -> 11 -> 5 GRU steps, not 6
  assert np.all(drop[1, 23:] == 0) and np.all(np.isfinite(drop))


def test_text_encoder_normalises_tokens():
  model = models.TextEncoder(vocab_size=10, embed_dim=6)
  tokens = jnp.array([[3, 4, 0]])
  mask = tokens != 0
  variables = model.init(jax.random.key(0), tokens, mask)
  out = np.asarray(model.apply(variables, tokens, mask))
  table = np.asarray(variables["params"]["embed"]["embedding"])
  np.testing.assert_allclose(out[0, 0], table[3] / np.linalg.norm(table[3]), rtol=1e-5)
  assert np.all(out[0, 2] == 0)


def test_channels_and_pools_must_agree():
  model = models.CRNN(channels=(4, 8), embed_dim=4)
  audio, mask = crnn_inputs([8], 8)
  with pytest.raises(ValueError, match="2 channel counts but 5 pools"):
    model.init(jax.random.key(0), audio, mask, train=False)


def test_zero_vectors_normalise_to_zero_with_finite_gradient():
  grad = jax.grad(lambda x: models.l2_normalize(x, jnp.array([True, True])).sum())(
      jnp.array([[0.0, 0.0], [3.0, 4.0]]))
  assert np.all(np.isfinite(np.asarray(grad)))
  np.testing.assert_allclose(models.l2_normalize(jnp.array([[0.0, 0.0], [3.0, 4.0]]),
                                                 jnp.array([True, True])),
                             [[0, 0], [0.6, 0.8]], rtol=1e-6)


def test_pytorch_initializer_draws_kaiming_normal_convs_and_uniform_gru():
  model = models.CRNN((32, 128, 128, 128, 128), embed_dim=300, initializer="pytorch")
  audio, mask = crnn_inputs([16], 16)
  params = jax.jit(model.init, static_argnames="train")(jax.random.key(0), audio, mask,
                                                        train=False)["params"]
  kernel = np.asarray(params["Conv_2"]["kernel"])  # 3 x 3 x 128 in -> 128 out
  np.testing.assert_allclose(kernel.std(), np.sqrt(2 / (3 * 3 * 128)), rtol=0.02)
  assert np.abs(kernel).max() > 3.5 * np.sqrt(2 / (3 * 3 * 128))  # normal, not truncated at 2 std
  bound = 1 / np.sqrt(150)  # PyTorch's GRU: U(-1/sqrt(hidden), 1/sqrt(hidden)), hidden 150
  gru = jax.tree.leaves((params["GRUCell_0"], params["GRUCell_1"]))
  values = np.concatenate([np.ravel(leaf) for leaf in gru])
  assert np.abs(values).max() <= bound and np.abs(values).max() > 0.99 * bound
  np.testing.assert_allclose(values.std(), bound / np.sqrt(3), rtol=0.02)  # uniform's std
  with pytest.raises(ValueError, match="initializer must be one of"):
    models.CRNN(initializer="keras").init(jax.random.key(0), audio, mask, train=False)


def test_bfloat16_compute_trains_like_float32_with_float32_state():
  """Sixteen Adam steps at rate 1e-2 on one batch in each compute dtype, from the same
  parameters. The first step's loss differs only by bfloat16's rounding: within 0.01
  (2^-7, one bfloat16 step at 1.0; 0.0027 measured). After it the parameters part and
  the losses drift apart, bfloat16 trailing. That drift is the trajectory's, not one
  rounding's: 0.052 at most for this batch, 0.05 to 0.12 for the batches and
  initialisations of seeds 0 to 5. The bound 0.1 leaves this batch's drift room for
  another CPU's rounding; a tighter one would pin this batch's path, not test the dtype."""
  rng = np.random.default_rng(0)
  lengths, words = rng.integers(20, 65, 8), rng.integers(2, 7, 8)
  frame_mask, word_mask = np.arange(64) < lengths[:, None], np.arange(6) < words[:, None]
  batch = dict(audio=(rng.normal(size=(8, 64, 64)) * frame_mask[..., None]).astype(np.float32),
               audio_mask=frame_mask, tokens=rng.integers(1, 30, (8, 6)).astype(np.int32),
               token_mask=word_mask, audio_id=np.arange(8, dtype=np.int32) // 2)
  losses = {}
  for dtype in ("float32", "bfloat16"):
    model = models.DualEncoder(vocab_size=30, dtype=dtype, dropout=0.0, **SMALL)
    state = steps.create_train_state(model, jax.random.key(0), frames=64, words=6,
                                     mel_bands=64, learning_rate=1e-2)
    audio, text = jax.jit(model.apply)(state.variables(), batch)
    assert audio.dtype == text.dtype == jnp.dtype(dtype)
    step = jax.jit(steps.train_step)
    losses[dtype] = []
    for i in range(16):
      state, statistics = step(state, batch, jax.random.key(i))
      losses[dtype].append(float(statistics.loss))
    assert {leaf.dtype for leaf in jax.tree.leaves((state.params, state.opt_state))} <= {
        jnp.dtype("float32"), jnp.dtype("int32")}
  for dtype in losses:  # both learn; bfloat16 trails float32 a little on a model this small
    assert losses[dtype][-1] < losses[dtype][0] - 0.15, dtype
  assert abs(losses["bfloat16"][0] - losses["float32"][0]) <= 0.01
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], atol=0.1)
  with pytest.raises(ValueError, match=r"compute dtype must be one of .*'float16'"):
    models.DualEncoder(vocab_size=30, dtype="float16", **SMALL).init(
        jax.random.key(0), batch)


def test_one_train_step_is_adams_first_step_on_the_losss_gradient():
  """Adam's first step moves each parameter by -lr * g / (|g| + eps) (its moments are g
  and g^2, bias-corrected); the batch statistics move too. The gradient here is taken
  apart from the step, of the same loss, and the loss is the triplet loss's own."""
  rng = np.random.default_rng(0)
  batch = dict(audio=rng.normal(size=(4, 32, 64)).astype(np.float32),
               audio_mask=np.ones((4, 32), bool),
               tokens=rng.integers(2, 30, (4, 5)).astype(np.int32),
               token_mask=np.ones((4, 5), bool), audio_id=np.array([0, 0, 1, 2], np.int32))
  batch = jax.tree.map(jnp.asarray, batch)
  model = models.DualEncoder(vocab_size=30, dropout=0.0, **SMALL)
  state = steps.create_train_state(model, jax.random.key(0), frames=32, words=5, mel_bands=64,
                                   learning_rate=1e-2)
  key = jax.random.key(3)
  def loss(params):
    (audio, text), _ = model.apply(state.variables(params), batch, train=True,
                                   mutable=["batch_stats"],
                                   rngs={"dropout": jax.random.split(key)[0]})
    return sampling.triplet_loss(audio, text, batch["audio_id"], strategy="semihard_cross",
                                 audio_mask=batch["audio_mask"], text_mask=batch["token_mask"])
  value, grads = jax.jit(jax.value_and_grad(loss))(state.params)
  new, statistics = jax.jit(steps.train_step)(state, batch, key)
  assert float(statistics.loss) == pytest.approx(float(value), rel=1e-5)
  # Where |g| nears eps the step's size hangs on g's last digits, which two compiled
  # programs round apart: there only its bound, lr, is checked.
  def check(old, moved, g):
    old, moved, g = (np.asarray(x, np.float64) for x in (old, moved, g))
    clear = np.abs(g) > 1e-5
    np.testing.assert_allclose(moved[clear], (old - 1e-2 * g / (np.abs(g) + 1e-8))[clear],
                               atol=1e-6)
    assert np.all(np.abs(moved - old) <= 1e-2 * (1 + 1e-5))
  jax.tree.map(check, state.params, new.params, grads)
  assert int(new.step) == 1 and not jax.tree.all(jax.tree.map(
      lambda a, b: bool(jnp.all(a == b)), new.batch_stats, state.batch_stats))


def test_training_statistics_by_hand():
  """Two valid anchors (the third's pool is empty), both directions, margin 0.5; binary
  fractions, so every comparison is exact."""
  terms = sampling.LossTerms(positive=jnp.array([0.75, 0.5, 0.625]),
                             negative=jnp.array([[0.25, 0.75], [0.5, 1.0], [0.125, 0.25]]),
                             valid=jnp.array([True, True, False]),
                             weights=jnp.zeros((2, 3, 3)))
  found = steps.TrainingStatistics.of(jnp.float32(0.3), jnp.float32(2.0), terms, 0.5).to_dict()
  # gaps (negative - positive): [-0.5, 0.0] and [0.0, 0.5]: one at zero loss (-0.5 + 0.5
  # <= 0), two scored as the positive; positives 0.75 and 0.5; negatives 0.25, 0.75, 0.5, 1.
  assert found == pytest.approx(dict(
      loss=0.3, grad_norm=2.0, share_zero_loss=0.25, share_at_margin=0.5, positive_mean=0.625,
      positive_std=0.125, negative_mean=0.625, negative_std=np.sqrt(0.078125)))
