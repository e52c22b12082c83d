"""Caption similarity, the pool filter and the measured false negatives, against hand
computations and the built-in corpus's own captions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntxr import false_negatives, sampling, settings, steps
from ntxr.data import synthetic


def test_tfidf_similarity_is_the_cosine_of_hand_made_vectors():
  captions = [[5, 6, 6], [5, 7], [8]]  # token ids
  idf = false_negatives.inverse_document_frequency(captions, 10)
  assert idf[5] == pytest.approx(np.log(4 / 3) + 1) and idf[8] == pytest.approx(np.log(2) + 1)
  tokens = np.array([[5, 6, 6, 0], [5, 7, 0, 0], [8, 0, 0, 0]])
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
  first = np.array([idf[5], 2 * idf[6], 0])   # over tokens 5, 6, 7
  second = np.array([idf[5], 0, idf[7]])
  expected = first @ second / np.linalg.norm(first) / np.linalg.norm(second)
  found = false_negatives.tfidf_similarity(tokens, mask, idf)
  assert found[0, 1] == pytest.approx(expected, rel=1e-6) and found[0, 2] == 0
  np.testing.assert_allclose(np.diagonal(found), 1, rtol=1e-6)


def test_word_vector_similarity_uses_the_masked_mean():
  table = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], float)
  tokens, mask = np.array([[1, 2, 3], [1, 1, 2]]), np.array([[1, 0, 0], [1, 1, 1]], bool)
  # means: (1, 0) and (2/3, 1/3): cosine 2 / sqrt(5)
  found = false_negatives.word_vector_similarity(tokens, mask, table)
  assert found[0, 1] == pytest.approx(2 / np.sqrt(5), rel=1e-6)


def test_event_similarity_is_jaccard_and_same_events_is_equality():
  events = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1]], bool)
  found = false_negatives.event_similarity(events)
  assert found[0, 1] == pytest.approx(0.5) and found[0, 2] == 1 and found[1, 3] == 0
  same = np.asarray(false_negatives.same_events(jnp.asarray(events)))
  np.testing.assert_array_equal(same, found == 1)


def test_filter_drops_similar_captions_and_scores_above_a_share_of_the_positive():
  s = jnp.array([[0.8, 0.7, 0.1],
                 [0.2, 0.5, 0.6],
                 [0.3, 0.1, 0.9]])
  pool = sampling.negative_pool(jnp.array([0, 1, 2]))
  similarity = jnp.array([[1, .2, .95], [.2, 1, .1], [.95, .1, 1]])
  by_similarity = false_negatives.filter_pool(pool, s, similarity, max_similarity=0.9,
                                              max_share_of_positive=0)
  np.testing.assert_array_equal(by_similarity, pool & (similarity <= 0.9))
  by_share = np.asarray(false_negatives.filter_pool(pool, s, None, max_similarity=0,
                                                    max_share_of_positive=0.8))
  expected = np.asarray(pool).copy()
  for i in range(3):
    for j in range(3):
      if max(s[i, j], s[j, i]) > 0.8 * s[i, i]:  # either direction above 80% of i's positive
        expected[i, j] = False
  np.testing.assert_array_equal(by_share, expected)
  assert expected[0].tolist() == [False, False, True]  # 0.7 > 0.64 goes, 0.3 stays
  with pytest.raises(ValueError, match="similarity source"):
    false_negatives.filter_pool(pool, s, None, max_similarity=0.5, max_share_of_positive=0)


def test_relevance_is_one_on_positives_and_the_logistic_elsewhere():
  similarity = jnp.array([[1.0, 0.4], [0.4, 1.0]])
  found = false_negatives.relevance(similarity, jnp.eye(2, dtype=bool), 10.0, 5.0)
  assert float(found[0, 1]) == pytest.approx(1 / (1 + np.exp(1.0))) and float(found[0, 0]) == 1


def test_chance_share_counts_ordered_pairs_with_the_same_kinds():
  # {dog}, {dog}, {dog, rain}, {rain, dog}, {car}: pairs (0,1), (1,0), (2,3), (3,2) of 20.
  kinds = [["dog"], ["dog"], ["dog", "rain"], ["rain", "dog"], ["car"]]
  assert false_negatives.chance_share(kinds) == pytest.approx(4 / 20)
  assert false_negatives.chance_share([["dog"]]) == 0


def test_shares_by_hand():
  weights = jnp.zeros((2, 3, 3)).at[0, 0, 1].set(1).at[0, 1, 0].set(.5).at[0, 1, 2].set(.5)
  pool = ~jnp.eye(3, dtype=bool)
  kept = pool.at[2, 0].set(False).at[2, 1].set(False)
  false = jnp.zeros((3, 3), bool).at[0, 1].set(True).at[1, 0].set(True).at[2, 0].set(True)
  found = {k: float(v)
           for k, v in false_negatives.measured_shares(weights, pool, kept, false).items()}
  # Anchors with negatives: caption anchors 0 (weight 1 on a false one) and 1 (0.5).
  assert found == pytest.approx(dict(false_negative_share=0.75, filtered_share=2 / 6,
                                     filtered_false_share=0.5))


def fake_batch():
  """Six captions of five clips; clips 0 and 3 share their events, as do 1 and 4, and
  their embeddings are alike, so a hard negative is a false one."""
  rng = np.random.default_rng(0)
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  audio = rng.normal(size=(6, 4, 5))
  audio[3], audio[4] = audio[0] + 0.1 * audio[3], audio[1] + 0.1 * audio[4]
  text = audio[:, :3] + 0.1 * rng.normal(size=(6, 3, 5))  # each caption fits its clip
  audio, text = unit(audio), unit(text)
  events = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 0, 0], [0, 1, 1], [1, 0, 0]], bool)
  batch = dict(audio_mask=np.ones((6, 4), bool), token_mask=np.ones((6, 3), bool),
               audio_id=np.array([0, 1, 2, 3, 4, 0]), events=events,
               caption_similarity=false_negatives.event_similarity(events))
  encoders = lambda variables, inputs, train: (audio, text)
  return batch, encoders


@pytest.mark.parametrize("objective,strategy", [("triplet", "hard_cross"),
                                                ("triplet", "full_batch"), ("infonce", None)])
def test_the_step_measures_false_negatives_and_the_events_filter_removes_exactly_them(
    objective, strategy):
  batch, encoders = fake_batch()
  def shares(**filter_bounds):
    loss = settings.Loss(objective=objective, strategy=strategy or "semihard_cross",
                      **filter_bounds)
    _, (_, terms, found) = steps._loss_and_terms({}, None, encoders, batch,
                                                 jax.random.key(0), train=False, loss=loss)
    return terms, {k: float(v) for k, v in found.items()}
  terms, unfiltered = shares()
  pool = np.asarray(sampling.negative_pool(jnp.asarray(batch["audio_id"])))
  same = np.all(batch["events"][:, None] == batch["events"][None], axis=-1) & pool
  weights = np.asarray(terms.weights)
  per_anchor = [weights[d, i][same[i]].sum() for d in range(2) for i in range(6)
                if weights[d, i].sum() > 0]
  assert unfiltered["false_negative_share"] == pytest.approx(np.mean(per_anchor), rel=1e-5)
  assert unfiltered["false_negative_share"] > 0 and unfiltered["filtered_share"] == 0
  _, filtered = shares(filter_similarity=0.99)  # drops exactly the same-event clips
  assert filtered == pytest.approx(dict(false_negative_share=0.0,
                                        filtered_share=same.sum() / pool.sum(),
                                        filtered_false_share=1.0))


def test_built_in_clips_record_the_events_their_captions_name():
  seconds = synthetic.SHORT_CLIP_SECONDS
  kinds = {kind.name: kind for kind in synthetic.EVENT_KINDS}
  for index in range(12):
    _, captions = synthetic.make_clip(0, 1, index, seconds)
    named = synthetic.event_kinds(0, 1, index, seconds)
    assert 1 <= len(named) <= 3
    for caption in captions:
      for name in named:
        assert any(noun in caption.lower() for noun in kinds[name].nouns), (caption, name)
