"""Caption similarity, the pool filter and the measured false negatives, against hand
computations and the built-in corpus's own captions."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntxr import ctrl_c, false_negatives, sampling, settings, steps
from ntxr.configs import default
from ntxr.data import synthetic
from processes import ctrl_c_while_reading


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


def test_a_candidate_exactly_at_a_filters_bound_is_kept():
  """Both filters drop what is above their bound (a caption "more similar than" it, a
  score "above" the share of the positive): a candidate exactly at the bound stays, one
  float32 step above it goes."""
  above = lambda bound: np.nextafter(np.float32(bound), np.float32(1))
  pool = sampling.negative_pool(jnp.array([0, 1, 2]))
  kept = [[False, True, False], [True, False, True], [False, True, False]]
  similarity = jnp.array([[1, 0.5, above(0.5)], [0.5, 1, 0], [above(0.5), 0, 1]])
  by_similarity = false_negatives.filter_pool(pool, jnp.zeros((3, 3)), similarity,
                                              max_similarity=0.5, max_share_of_positive=0)
  assert np.asarray(by_similarity).tolist() == kept
  # Positives 0.5 and a share of 0.5: the bound is 0.25, exact in float32.
  s = jnp.array([[0.5, 0.25, above(0.25)], [0.1, 0.5, 0.1], [0.1, 0.1, 0.5]])
  by_share = false_negatives.filter_pool(pool, s, None, max_similarity=0,
                                         max_share_of_positive=0.5)
  assert np.asarray(by_share).tolist() == kept


def test_the_steps_caption_filter_keeps_a_caption_exactly_at_its_bound():
  """Through a step's loss with --config.filter_similarity as its settings carry it: the
  events' Jaccard similarity of 0.5 (clips 1 and 4 against clip 2) stays in the pool at a
  bound of 0.5, and goes at a bound one step below it."""
  batch, encoders = fake_batch()
  similarity, pool = batch["caption_similarity"], np.asarray(
      sampling.negative_pool(jnp.asarray(batch["audio_id"])))
  assert ((similarity[pool] > 0.5).sum(), (similarity[pool] == 0.5).sum()) == (6, 4)
  for bound in (0.5, float(np.nextafter(np.float32(0.5), np.float32(0)))):
    loss = settings.Loss(strategy="hard_cross", filter_similarity=bound)
    _, (_, _, found, _) = steps._loss_and_terms({}, None, encoders, batch, jax.random.key(0),
                                             train=False, loss=loss)
    assert float(found["filtered_share"]) == pytest.approx(
        (similarity[pool] > bound).sum() / pool.sum(), abs=1e-7)


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
    _, (_, terms, found, _) = steps._loss_and_terms({}, None, encoders, batch,
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


TAU = os.path.join(os.path.dirname(__file__), "data", "tau_relevances")


@pytest.mark.parametrize("seed", range(3))
def test_roc_auc_threshold_and_precision_match_loops_over_pairs(seed):
  rng = np.random.default_rng(seed)
  score = rng.integers(0, 8, 60) / 8  # ties
  label = rng.random(60) < 0.2 + 0.6 * score
  positives, negatives = score[label], score[~label]
  wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
  pairs = len(positives) * len(negatives)
  assert false_negatives.roc_auc(score, label) == pytest.approx(wins / pairs)
  for threshold in (0.0, 0.3, 0.7):
    flagged = [i for i in range(60) if score[i] > threshold]
    got = false_negatives.at_threshold(score, label, threshold)
    assert got["flagged"] == len(flagged) / 60
    assert got["recall"] == sum(label[i] for i in flagged) / label.sum()
    assert got["precision"] == pytest.approx(sum(label[i] for i in flagged) / len(flagged))
  reaching = [t for t in sorted(set(score)) if any(score > t)
              and np.mean(label[score > t]) >= 0.6]
  assert false_negatives.threshold_for_precision(score, label, 0.6) == (
      reaching[0] if reaching else None)


def test_rated_candidates_are_the_15_rated_clips_of_each_query():
  import csv  # pylint: disable=import-outside-toplevel
  from ntxr import relevance  # pylint: disable=import-outside-toplevel
  read = lambda name: list(csv.DictReader(open(os.path.join(TAU, name), encoding="utf-8")))
  names = {r["fid"]: r["file_name"] for r in read("evaluation_audio_metadata.csv")}
  texts = read("evaluation_text.csv")
  query_text = {r["tid"]: r["text"] for r in texts}
  captions = {}
  for r in texts:
    captions.setdefault(names[r["fid"]], []).append(r["text"])
  # A similarity anyone can check: the share of the query's words in the caption.
  def overlap(batch):
    words = [set(t.lower().split()) for t in batch]
    return np.array([[len(a & b) / len(a) for b in words] for a in words])
  expected = {"caption": ([], []), "max": ([], []), "mean": ([], [])}
  for r in read("evaluation_relevances.csv"):
    if r["fid_group"] != "C15":
      continue
    values = overlap([query_text[r["tid"]]] + captions[names[r["fid"]]])[0, 1:]
    for name, got in (("caption", values), ("max", [max(values)]), ("mean", [np.mean(values)])):
      expected[name][0].extend(got)
      expected[name][1].extend([float(r["rating"])] * len(got))
  found = false_negatives.rated_candidates(relevance.read_tau(TAU, "evaluation"), overlap)
  for name, (score, rating) in expected.items():
    assert len(found[name][0]) == len(score)
    order_got, order_expected = np.lexsort(found[name]), np.lexsort((score, rating))
    np.testing.assert_allclose(found[name][0][order_got], np.array(score)[order_expected])
    np.testing.assert_allclose(found[name][1][order_got], np.array(rating)[order_expected])
  assert len(found["max"][0]) == 12 * 15


def test_the_command_measures_every_rule_against_the_ratings(tmp_path):
  from ntxr import relevance  # pylint: disable=import-outside-toplevel
  words = sorted({w for f in relevance.read_tau(TAU, "development").captions.values()
                  for c in f for w in c.lower().replace(".", " ").replace(",", " ").split()})
  rng = np.random.default_rng(0)
  (tmp_path / "vectors.txt").write_text(f"{len(words)} 4\n" + "".join(
      f"{w} {' '.join(f'{x:.3f}' for x in rng.normal(size=4))}\n" for w in words))
  done = subprocess.run([sys.executable, "-m", "ntxr.false_negatives", f"--relevance_dir={TAU}",
                         f"--word_vectors={tmp_path}/vectors.txt", "--threshold=0.3",
                         f"--output_json={tmp_path}/rules.json"],
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
  rows = json.loads((tmp_path / "rules.json").read_text())
  assert [(r["rule"], r["combined"]) for r in rows] == [
      (rule, combined) for rule in ("tfidf", "word_vectors")
      for combined in ("caption", "max", "mean")]
  for row in rows:
    assert (row["fit"]["split"], row["report"]["split"]) == ("development", "evaluation")
    if row["combined"] != "caption":
      assert (row["fit"]["pairs"], row["report"]["pairs"]) == (8 * 15, 12 * 15)
    for role in ("fit", "report"):
      assert 0 <= row[role]["roc_auc"] <= 1 and row[role]["at_threshold"]["threshold"] == 0.3
    for role in ("fit", "report"):
      bands = row[role]["relevance_map"]["bands"]
      assert sum(b["pairs"] for b in bands["candidates"]) == row[role]["pairs"]
      assert [(b["low"], b["high"]) for b in bands["random"]] == [
          (None, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5), (0.5, None)]
  # The table, then a blank line, a title, a header and two lines a row and split.
  assert done.stdout.count("\n") == 1 + 2 * len(rows) + 3 + 4 * len(rows)


def test_the_relevance_map_by_band_against_hand_computed_means():
  """Bands s <= 0.1, (0.1, 0.2], ..., s > 0.5: a similarity on an edge falls in the band
  below it; sigmoid(10 s - 5) by hand."""
  sigmoid = lambda x: 1 / (1 + np.exp(-x))
  got = false_negatives.by_band(np.array([0.05, 0.1, 0.15, 0.5, 0.9]),
                                np.array([10, 20, 50, 60, 100]), 10.0, 5.0)
  assert [(b["low"], b["high"], b["pairs"]) for b in got] == [
      (None, 0.1, 2), (0.1, 0.2, 1), (0.2, 0.3, 0), (0.3, 0.4, 0), (0.4, 0.5, 1), (0.5, None, 1)]
  expected = [((sigmoid(-4.5) + sigmoid(-4.0)) / 2, 0.15), (sigmoid(-3.5), 0.5), (None, None),
              (None, None), (0.5, 0.6), (sigmoid(4.0), 1.0)]
  for band, (mapped, rated) in zip(got, expected):
    assert (band["mapped"], band["rated"]) == (
        (None, None) if mapped is None else (pytest.approx(mapped, rel=1e-6),
                                             pytest.approx(rated)))


def test_a_split_the_ratings_lack_is_named_with_those_they_hold(tmp_path):
  done = subprocess.run([sys.executable, "-m", "ntxr.false_negatives", f"--relevance_dir={TAU}",
                         "--fit_split=train", f"--output_json={tmp_path}/rules.json"],
                        capture_output=True, text=True, check=False)
  assert (done.returncode, done.stderr) == (
      2, f"error: --fit_split=train: {TAU} holds no such split's ratings "
      "(SPLIT_relevances.csv); it holds development, evaluation\n")
  assert not os.listdir(tmp_path)


def test_ctrl_c_costs_one_line_and_writes_nothing(tmp_path):
  """Ctrl-C while the command reads the ratings (one file a pipe that sends nothing):
  status 130, one line, no traceback, and nothing written."""
  ratings, output = tmp_path / "ratings", tmp_path / "rules.json"
  shutil.copytree(TAU, ratings)
  pipe = ratings / "development_audio_metadata.csv"
  pipe.unlink()
  os.mkfifo(pipe)
  assert ctrl_c_while_reading(pipe, ["ntxr.false_negatives", f"--relevance_dir={ratings}",
                                     f"--output_json={output}"]) == (130, f"{ctrl_c.AGAIN}\n", "")
  assert os.listdir(tmp_path) == ["ratings"]


def test_the_commands_default_threshold_is_where_the_configs_relevance_map_crosses_a_half(
    tmp_path):
  """Without --threshold the rules are measured at the similarity the config's soft
  relevance map takes to 1/2 (its relevance_offset / relevance_slope), and that map is the
  one compared with people's ratings; a config with another offset moves the default. The
  caption filter the threshold stands for is off in the config (0), and the flag's help
  says so, with both values."""
  config = default.get_config()
  threshold = config.relevance_offset / config.relevance_slope
  assert (threshold, config.filter_similarity) == (0.5, 0.0)  # 5 / 10; 0 is off
  assert float(false_negatives.relevance(jnp.array([[threshold]]), jnp.array([[False]]),
                                         config.relevance_slope, config.relevance_offset)
               [0, 0]) == 0.5
  done = subprocess.run([sys.executable, "-m", "ntxr.false_negatives", f"--relevance_dir={TAU}",
                         f"--output_json={tmp_path}/rules.json"],
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
  for row in json.loads((tmp_path / "rules.json").read_text()):
    for role in ("fit", "report"):
      assert row[role]["at_threshold"]["threshold"] == threshold
      assert (row[role]["relevance_map"]["slope"], row[role]["relevance_map"]["offset"]) == (
          config.relevance_slope, config.relevance_offset)
  code = """
from absl import flags
from ntxr import false_negatives
from ntxr.configs import default
made = default.get_config
def get_config():
  config = made()
  config.relevance_offset = 3.0
  return config
default.get_config = get_config
false_negatives.define_flags()
flags.FLAGS(["false_negatives"])
print(flags.FLAGS.threshold)
print(flags.FLAGS["threshold"].help)
"""
  moved = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
  value, help_text = moved.stdout.split("\n", 1)
  assert float(value) == 3.0 / config.relevance_slope
  assert "--config.filter_similarity drops it. That filter defaults to 0, off" in help_text
  assert help_text.rstrip().endswith("relevance_offset / relevance_slope = 0.3")
