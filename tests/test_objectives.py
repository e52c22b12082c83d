"""The contrastive objectives against a per-anchor NumPy loop written from their formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntxr import objectives, specs

SOFTMAX_OBJECTIVES = ("infonce", "hn_nce", "soft")


def log_sigmoid(x):
  return -np.logaddexp(0, -x)


def naive_loss(s, ids, objective, temperature=0.05, bias=0.0, beta=0.0, relevance=None,
               valid=None, text_pools=None, audio_pools=None, weight_scores=None):
  """The objective anchor by anchor, float64; pools[i, j]: anchor i may take negative j
  (padding rows and columns left out of every pool).
  hn_nce weighs negatives by weight_scores (default: s), which carry no gradient."""
  s, n = np.asarray(s, np.float64), len(ids)
  weight_z = np.asarray(s if weight_scores is None else weight_scores, np.float64) / temperature
  valid = np.ones(n, bool) if valid is None else np.asarray(valid)
  both_valid = valid[:, None] & valid[None, :]  # padding is no anchor's candidate
  other = (ids[:, None] != ids[None, :]) & both_valid
  text_pools = other if text_pools is None else text_pools & both_valid
  audio_pools = other if audio_pools is None else audio_pools & both_valid
  positive = lambda i, j: ids[i] == ids[j] and valid[i] and valid[j]
  z = s / temperature
  if objective == "siglip":
    total = 0.0
    for a in range(n):
      for t in range(n):
        if positive(a, t):
          total += log_sigmoid(z[a, t] + bias)
        elif audio_pools[a, t] and text_pools[t, a]:
          total += log_sigmoid(-(z[a, t] + bias))
    return -total / valid.sum()
  directions = []
  for scores, hardness, pools, rel in [
      (z, weight_z, audio_pools, relevance),  # audio anchors: rows
      (z.T, weight_z.T, text_pools, None if relevance is None else relevance.T)]:
    losses = []
    for i in range(n):
      if not valid[i] or not pools[i].any():
        continue
      candidates = [j for j in range(n) if positive(i, j) or pools[i, j]]
      negatives = [j for j in candidates if not positive(i, j)]
      weight = {j: 1.0 for j in candidates}
      if objective == "hn_nce":
        e = {j: np.exp(beta * hardness[i, j]) for j in negatives}
        weight.update({j: len(negatives) * e[j] / sum(e.values()) for j in negatives})
      denominator = sum(weight[j] * np.exp(scores[i, j]) for j in candidates)
      if objective == "soft":
        targets = {j: rel[i, j] for j in candidates}
      else:
        targets = {j: float(positive(i, j)) for j in candidates}
      total = sum(targets.values())
      losses.append(-sum(q / total * np.log(np.exp(scores[i, j]) / denominator)
                         for j, q in targets.items() if q > 0))
    directions.append(np.mean(losses) if losses else 0.0)
  return np.mean(directions)


@pytest.fixture
def batch():
  """Nine captions of five clips (repeated ids), scores in [-1, 1]."""
  rng = np.random.default_rng(0)
  ids = np.array([3, 1, 3, 4, 0, 1, 3, 2, 2])
  s = rng.uniform(-1, 1, size=(9, 9)).astype(np.float32)
  same = (ids[:, None] == ids[None, :]).astype(np.float32)
  relevance = np.maximum(same, rng.uniform(0, 0.6, size=(9, 9))).astype(np.float32)
  return s, ids, relevance


def jax_loss(s, ids, objective, **kwargs):
  kwargs = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
  return float(objectives.contrastive_loss(jnp.asarray(s), jnp.asarray(ids),
                                           objective=objective, **kwargs))


@pytest.mark.parametrize("objective,extra", [
    ("infonce", {}), ("hn_nce", dict(beta=2.0)), ("hn_nce", dict(beta=-1.0)),
    ("soft", {}), ("siglip", dict(bias=-0.7))])
def test_each_objective_matches_the_loop(batch, objective, extra):
  s, ids, relevance = batch
  kwargs = dict(extra, temperature=0.2, relevance=relevance)
  expected = naive_loss(s, ids, objective, **kwargs)
  assert jax_loss(s, ids, objective, **kwargs) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("given", ["filtered", "every other clip's", "none"])
@pytest.mark.parametrize("objective", [*SOFTMAX_OBJECTIVES, "siglip"])
def test_padding_rows_and_filtered_pools_are_left_out(batch, objective, given):
  """Pools filtered (and without padding), of every other clip's pair (padding
  included: left out all the same) or not given (the default pools)."""
  s, ids, relevance = batch
  valid = np.array([1, 1, 1, 1, 1, 1, 0, 1, 0], bool)
  rng = np.random.default_rng(1)
  other = ids[:, None] != ids[None, :]
  text_pools, audio_pools = other, other
  if given == "filtered":
    text_pools, audio_pools = other & valid & valid[:, None] & (rng.uniform(size=(2, 9, 9)) > 0.3)
    text_pools[4] = False  # caption anchor 4's whole pool filtered away
  kwargs = dict(temperature=0.3, beta=1.5, bias=0.4, relevance=relevance)
  expected = naive_loss(s, ids, objective, valid=valid, text_pools=text_pools,
                        audio_pools=audio_pools, **kwargs)
  pools = (None if given == "none" else
           objectives.Pools(jnp.asarray(text_pools), jnp.asarray(audio_pools)))
  found = jax_loss(s, ids, objective, valid=valid, pools=pools, **kwargs)
  assert found == pytest.approx(expected, rel=1e-5)
  # What padding rows hold changes nothing.
  s_changed = s.copy()
  s_changed[~valid], s_changed[:, ~valid] = 9.0, -9.0
  assert jax_loss(s_changed, ids, objective, valid=valid, pools=pools, **kwargs) == (
      pytest.approx(found, rel=1e-6))


@pytest.mark.parametrize("objective", SOFTMAX_OBJECTIVES)
def test_a_batch_of_one_clip_has_no_negatives_and_adds_zero(objective):
  s = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (4, 4)), jnp.float32)
  ids = jnp.zeros(4, jnp.int32)
  loss, grad = jax.value_and_grad(lambda s: objectives.contrastive_loss(
      s, ids, objective=objective, relevance=jnp.ones((4, 4))))(s)
  assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0)


def test_hn_nce_at_beta_zero_and_soft_at_relevance_p_are_infonce(batch):
  s, ids, _ = batch
  infonce = jax_loss(s, ids, "infonce", temperature=0.1)
  assert jax_loss(s, ids, "hn_nce", temperature=0.1, beta=0.0) == pytest.approx(infonce,
                                                                                 rel=1e-6)
  same = (ids[:, None] == ids[None, :]).astype(np.float32)
  assert jax_loss(s, ids, "soft", temperature=0.1, relevance=same) == pytest.approx(
      infonce, rel=1e-6)
  # A hardness above zero weights the high-scoring negatives up: the loss rises.
  assert jax_loss(s, ids, "hn_nce", temperature=0.1, beta=3.0) > infonce


@pytest.mark.parametrize("objective", [*SOFTMAX_OBJECTIVES, "siglip"])
def test_gradient_matches_finite_differences_of_the_loop(batch, objective):
  s, ids, relevance = batch
  kwargs = dict(temperature=0.5, beta=1.0, bias=-0.3, relevance=relevance)
  grad = np.asarray(jax.grad(lambda s: objectives.contrastive_loss(
      s, jnp.asarray(ids), objective=objective,
      **{k: jnp.asarray(v) if isinstance(v, np.ndarray) else v
         for k, v in kwargs.items()}))(jnp.asarray(s)))
  # hn_nce's weights are constants of the step: the loop keeps them at the unmoved scores.
  loop = functools.partial(naive_loss, ids=ids, objective=objective, weight_scores=s,
                           **kwargs)
  eps, rng = 1e-4, np.random.default_rng(3)
  for a, t in rng.integers(0, 9, size=(6, 2)):
    up, down = s.astype(np.float64).copy(), s.astype(np.float64).copy()
    up[a, t] += eps
    down[a, t] -= eps
    numeric = (loop(s=up) - loop(s=down)) / (2 * eps)
    assert grad[a, t] == pytest.approx(numeric, rel=1e-3, abs=1e-5), (a, t)


def test_vmap_over_batches_equals_one_at_a_time(batch):
  s, ids, _ = batch
  stack = jnp.stack([jnp.asarray(s), jnp.asarray(s[::-1, ::-1].copy())])
  loss = jax.jit(jax.vmap(functools.partial(objectives.contrastive_loss, objective="infonce",
                                            temperature=0.1)))
  found = loss(stack, jnp.stack([jnp.asarray(ids), jnp.asarray(ids[::-1].copy())]))
  for k in range(2):
    assert float(found[k]) == pytest.approx(
        jax_loss(np.asarray(stack[k]), [ids, ids[::-1]][k], "infonce", temperature=0.1),
        rel=1e-6)


@pytest.mark.parametrize("call,message", [
    (lambda s, i: objectives.contrastive_loss(s, i, objective="clip"), "unknown objective"),
    (lambda s, i: objectives.contrastive_loss(s[:3], i, objective="infonce"), r"\[N, N\]"),
    (lambda s, i: objectives.contrastive_loss(s, i.astype(jnp.float32), objective="infonce"),
     "integer vector"),
    (lambda s, i: objectives.contrastive_loss(s, i, objective="soft"), "needs relevance"),
])
def test_bad_arguments_raise(batch, call, message):
  s, ids, _ = batch
  with pytest.raises(ValueError, match=message):
    call(jnp.asarray(s), jnp.asarray(ids))


def test_an_objective_registered_at_run_time_is_specified_and_a_taken_name_refused(
    batch, monkeypatch):
  monkeypatch.setattr(specs, "OBJECTIVES", dict(specs.OBJECTIVES))
  monkeypatch.setattr(objectives, "OBJECTIVES", dict(objectives.OBJECTIVES))
  loss_and_terms = lambda embedded, setting, **_: (0.0, None)
  objectives.register("mine", loss_and_terms, needs_relevance=True)
  assert specs.OBJECTIVES["mine"].needs_relevance
  assert objectives.get_objective("mine").loss_and_terms is loss_and_terms
  with pytest.raises(ValueError, match="'infonce' exists already"):
    objectives.register("infonce", loss_and_terms)
  s, ids, _ = batch
  with pytest.raises(ValueError, match=r"unknown objective 'mine'; the whole-pool ones are "
                     r"\['infonce', 'hn_nce', 'soft', 'siglip'\]"):
    objectives.contrastive_loss(jnp.asarray(s), jnp.asarray(ids), objective="mine")


def test_siglip_learns_its_temperature_and_bias_from_10_and_minus_10():
  learnt = objectives.initial_parameters("siglip")["objective"]
  assert float(jnp.exp(learnt["log_inverse_temperature"])) == pytest.approx(10.0)
  assert float(learnt["bias"]) == -10.0
  assert objectives.initial_parameters("infonce") == {}


def naive_negative_weights(s, ids, objective, temperature, beta, bias, pool):
  """[2, N, N]: each caption anchor's weight on clips, then each audio anchor's on
  captions, from the formulas: a softmax over the anchor's pool of z (infonce, soft), of
  z plus hn_nce's log(|pool| softmax(beta z)), or siglip's sigmoid(z + bias) normalised."""
  z = s / temperature
  weights = np.zeros((2, len(ids), len(ids)))
  for d, rows in enumerate((z.T, z)):
    for i, row in enumerate(rows):
      members = [j for j in range(len(ids)) if pool[i, j]]
      if not members:
        continue
      x = np.array([row[j] for j in members], np.float64)
      if objective == "hn_nce":
        hard = np.exp(beta * x) / np.exp(beta * x).sum()
        x = x + np.log(len(members) * hard)
      if objective == "siglip":
        share = 1 / (1 + np.exp(-(x + bias)))
      else:
        share = np.exp(x - x.max())
      weights[d, i, members] = share / share.sum()
  return weights


@pytest.mark.parametrize("objective", [*SOFTMAX_OBJECTIVES, "siglip"])
def test_the_weights_each_negative_carries_match_the_formulas(batch, objective):
  """A training batch's loss and terms: siglip's at its learnt temperature (1/5, where
  the setting says 0.9) and bias; each anchor's mean pool score, by direction."""
  s, ids, relevance = batch
  pool = (ids[:, None] != ids[None, :]) & (np.random.default_rng(3).uniform(size=(9, 9)) > 0.2)
  pool[5] = False  # an anchor whose pool is filtered away: no weight at all
  learnt, temperature = {}, 0.2
  if objective == "siglip":
    learnt, temperature = {"log_inverse_temperature": jnp.log(5.0),
                           "bias": jnp.float32(-0.7)}, 0.9
  loss, terms = objectives.whole_pool_loss_and_terms(
      jnp.asarray(s), jnp.asarray(ids), learnt, objective=objective, temperature=temperature,
      beta=1.5, relevance=jnp.asarray(relevance),
      pools=objectives.Pools(jnp.asarray(pool), jnp.asarray(pool)))
  assert float(loss) == pytest.approx(naive_loss(
      s, ids, objective, temperature=0.2, bias=-0.7, beta=1.5, relevance=relevance,
      text_pools=pool, audio_pools=pool), rel=1e-5)
  expected = naive_negative_weights(s.astype(np.float64), ids, objective, 0.2, 1.5, -0.7, pool)
  np.testing.assert_allclose(terms.weights, expected, rtol=1e-5, atol=1e-7)
  assert not np.asarray(terms.valid)[5]
  mean = lambda rows: (rows * pool).sum(1) / np.maximum(pool.sum(1), 1)
  np.testing.assert_allclose(terms.negative, np.stack([mean(s.T), mean(s)], 1), rtol=1e-5,
                             atol=1e-7)  # a caption's clips, a clip's captions


def test_a_row_far_below_the_others_still_spreads_its_weight_over_its_pool():
  """Each row's softmax is its own: scores of +1 and -1 at temperature 0.01; a row
  without a pool gets 0."""
  logits = jnp.array([[100.0, 99.0, 0.0], [-100.0, -101.0, -99.5], [5.0, 0.0, 0.0]])
  pool = jnp.array([[True, True, False], [True, True, True], [False, False, False]])
  found = np.asarray(objectives.pool_weights(logits, pool))
  x = np.where(pool, np.asarray(logits, np.float64), -np.inf)
  e = np.exp(x - x.max(1, initial=0, where=np.asarray(pool), keepdims=True))  # 0: no pool
  expected = e / np.maximum(e.sum(1, keepdims=True), 1e-300)
  np.testing.assert_allclose(found, expected, rtol=1e-6)
  np.testing.assert_allclose(found.sum(1), [1, 1, 0], rtol=1e-6)
