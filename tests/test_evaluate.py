"""Retrieval metrics against hand-made rankings and a naive per-query loop."""

import dataclasses
import math

import numpy as np
import pytest

from ntxr import evaluate, ranking, scores


def naive_metrics(score, relevant):
  """One query at a time, with Python lists."""
  out = {k: [] for k in ["R@1", "R@5", "R@10", "HR@1", "HR@5", "HR@10", "mAP", "mAP@10"]}
  for s, r in zip(score.tolist(), relevant.tolist()):
    ranked = sorted(range(len(s)), key=lambda j: (-s[j], j))
    hits = [r[j] for j in ranked]
    total = sum(hits)
    for k in (1, 5, 10):
      out[f"R@{k}"].append(sum(hits[:k]) / total)
      out[f"HR@{k}"].append(float(any(hits[:k])))
    precisions = [sum(hits[:i + 1]) / (i + 1) for i in range(len(hits))]
    out["mAP"].append(sum(p for p, h in zip(precisions, hits) if h) / total)
    out["mAP@10"].append(sum(p for p, h in zip(precisions[:10], hits[:10]) if h)
                         / min(total, 10))
  return {k: float(np.mean(v)) for k, v in out.items()}


def test_hand_made_ranking():
  # Query 0 ranks items 3, 1, 0, 2 (relevant: 1 and 2): hits at ranks 2 and 4.
  # Query 1 ranks items 0, 1, 2, 3 with ties broken by index (relevant: 0): rank 1.
  score = np.array([[0.3, 0.5, 0.1, 0.9], [0.2, 0.2, 0.2, 0.2]])
  relevant = np.array([[False, True, True, False], [True, False, False, False]])
  m = ranking.retrieval_metrics(score, relevant)
  assert m["R@1"] == pytest.approx((0 + 1) / 2)
  assert m["HR@1"] == pytest.approx(0.5)
  assert m["R@5"] == m["HR@5"] == pytest.approx(1.0)
  ap0 = (1 / 2 + 2 / 4) / 2
  assert m["mAP"] == pytest.approx((ap0 + 1) / 2)
  assert m["mAP@10"] == pytest.approx((ap0 + 1) / 2)


def test_matches_naive_loop_with_many_relevant_items():
  rng = np.random.default_rng(0)
  score = rng.normal(size=(40, 60)).round(1)  # rounding makes ties
  relevant = rng.random((40, 60)) < 0.2
  relevant[np.arange(40), rng.integers(0, 60, 40)] = True
  got = ranking.retrieval_metrics(score, relevant)
  for name, value in naive_metrics(score, relevant).items():
    assert got[name] == pytest.approx(value), name


def test_map_at_10_divides_by_at_most_ten():
  score = -np.arange(30.0)[None]  # item j ranks j + 1
  relevant = np.zeros((1, 30), bool)
  relevant[0, :12] = True  # 12 relevant: the top 10 are all hits
  m = ranking.retrieval_metrics(score, relevant)
  assert m["mAP@10"] == pytest.approx(1.0)
  assert m["R@10"] == pytest.approx(10 / 12)


def test_both_directions_uses_clip_ids():
  # Two clips, four captions (two each); clip 0 scores its captions highest.
  s = np.array([[0.9, 0.8, 0.1, 0.7], [0.2, 0.3, 0.6, 0.5]])
  clip_ids, caption_ids = np.array([10, 11]), np.array([10, 10, 11, 11])
  m = evaluate.both_directions(s, clip_ids, caption_ids)
  assert "HR@1" not in m["t2a"]
  assert m["t2a"]["R@1"] == pytest.approx(3 / 4)  # caption 3 prefers clip 0
  assert m["a2t"]["R@1"] == pytest.approx(1 / 2)  # one of two relevant captions at rank 1
  assert m["a2t"]["HR@1"] == pytest.approx(1.0)


def test_bad_inputs_are_reported():
  with pytest.raises(ValueError, match="query 1 has no relevant item"):
    ranking.retrieval_metrics(np.zeros((2, 3)), np.array([[1, 0, 0], [0, 0, 0]], bool))
  with pytest.raises(FloatingPointError, match="NaN"):
    ranking.retrieval_metrics(np.array([[np.nan, 1.0]]), np.array([[True, False]]))


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_a_nan_embedding_stops_scoring_whatever_the_scores(modality):
  """A NaN frame or word is refused before scoring: on XLA's CPU a hinge or relu can turn
  NaN scores into finite ones, so the scores alone would not tell."""
  rng = np.random.default_rng(0)
  split = evaluate.SplitEmbeddings(
      audio=rng.normal(size=(3, 5, 4)).astype(np.float32), audio_mask=np.ones((3, 5), bool),
      clip_ids=np.arange(3), text=rng.normal(size=(6, 2, 4)).astype(np.float32),
      text_mask=np.ones((6, 2), bool), caption_ids=np.repeat(np.arange(3), 2))
  scored = lambda: evaluate.finite_scores(split, evaluate.runs_scores([split], "alignment")[0])
  assert np.isfinite(scored()).all()
  getattr(split, modality)[1, 0, 2] = np.nan
  with pytest.raises(FloatingPointError, match="the model's embeddings became NaN or infinite"):
    scored()
  with pytest.raises(FloatingPointError, match="retrieval scores became NaN or infinite"):
    evaluate.finite_scores(dataclasses.replace(split, **{modality: np.zeros((1, 1, 1))}),
                           np.array([[0.5, np.inf]]))


@pytest.mark.parametrize("score", ["alignment", "pooled"])
def test_runs_scored_together_are_each_runs_matrix(score):
  """Three runs' embeddings of one split, scored in one program per block (chunks of 3
  clips, blocks of 5 words), give each run's own matrix, by the scorer over the whole
  split at once."""
  rng = np.random.default_rng(3)
  audio, text = rng.normal(size=(3, 7, 9, 8)), rng.normal(size=(3, 6, 4, 8))
  audio_mask, text_mask = rng.random((7, 9)) < 0.8, rng.random((6, 4)) < 0.8
  audio_mask[:, 0] = text_mask[:, 0] = True
  audio_mask[2, 4:] = False
  splits = [evaluate.SplitEmbeddings(a.astype(np.float32), audio_mask, np.arange(7),
                                     t.astype(np.float32), text_mask, np.arange(6) % 7)
            for a, t in zip(audio, text)]
  together = evaluate.score_matrix(audio.astype(np.float32), audio_mask,
                                   text.astype(np.float32), text_mask, score=score, chunk=3,
                                   word_block=5)
  assert together.shape == (3, 7, 6)
  for run in range(3):
    alone = scores.get_scorer(score).matrix(audio[run].astype(np.float32),
                                            text[run].astype(np.float32), audio_mask, text_mask)
    np.testing.assert_allclose(together[run], alone, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(evaluate.runs_scores(splits, score), together, rtol=1e-6)


@pytest.mark.parametrize("frame_multiple,word_block", [(2, 3), (64, 5), (64, 4096)])
def test_score_matrix_in_blocks_equals_one_call(frame_multiple, word_block):
  rng = np.random.default_rng(1)
  audio, text = rng.normal(size=(7, 9, 8)), rng.normal(size=(6, 4, 8))
  audio_mask, text_mask = rng.random((7, 9)) < 0.8, rng.random((6, 4)) < 0.8
  audio_mask[:, 0] = text_mask[:, 0] = True
  audio_mask[2, 4:] = audio_mask[5, 2:] = False  # short clips: their chunk is cut
  text_mask[:, 3] = False  # no caption uses the last word slot
  text_mask[4] = False  # an empty caption scores 0
  blocks = evaluate.score_matrix(audio.astype(np.float32), audio_mask,
                                 text.astype(np.float32), text_mask, chunk=3,
                                 frame_multiple=frame_multiple, word_block=word_block)
  whole = scores.alignment_scores(audio.astype(np.float32), text.astype(np.float32),
                                  audio_mask, text_mask)
  np.testing.assert_allclose(blocks, whole, rtol=1e-5, atol=1e-7)
  assert not blocks[:, 4].any()
  with pytest.raises(ValueError, match="caption 0 has 3 words, more than a word block's 2"):
    evaluate.score_matrix(audio, audio_mask, text[:1], text_mask[:1] | [1, 1, 1, 0], word_block=2)


@pytest.mark.parametrize("score", ["alignment", "pooled"])
def test_clips_made_once_score_any_captions_as_the_whole_matrix(score):
  rng = np.random.default_rng(2)
  lengths = [9, 3, 7, 1, 6]  # ragged clips, as a search index keeps them
  frames = [rng.normal(size=(n, 8)).astype(np.float32) for n in lengths]
  audio = np.zeros((5, 9, 8), np.float32)
  for i, f in enumerate(frames):
    audio[i, :len(f)] = f
  audio_mask = np.arange(9) < np.array(lengths)[:, None]
  clips = evaluate.Clips.of(frames, [np.ones(n, bool) for n in lengths], score=score, chunk=2)
  scorer = scores.get_scorer(score).matrix
  for captions in (1, 6):
    text = rng.normal(size=(captions, 4, 8)).astype(np.float32)
    text_mask = np.arange(4) < rng.integers(1, 5, (captions, 1))
    expected = scorer(audio, text, audio_mask, text_mask)
    np.testing.assert_allclose(clips.scores(text, text_mask), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(evaluate.score_matrix(audio, audio_mask, text, text_mask,
                                                     score=score), expected, rtol=1e-5, atol=1e-6)
  none = evaluate.Clips.of([], [], score=score)  # a folder with no recordings to search
  assert none.scores(text, text_mask).shape == (0, 6)


def test_collapse_diagnostics():
  thresholds = dict(cosine=0.9, effective_rank=2.0, share_at_margin=0.5, score_std=1e-3)
  mask = np.ones((6, 3), bool)
  same = np.tile(np.array([1.0, 2.0, 0.0, 0.0, 0.0, 0.0]), (6, 3, 1))
  distinct = np.tile(np.eye(6)[:, None, :], (1, 3, 1))
  collapsed = evaluate.collapse_diagnostics(same, mask, distinct, mask, None, thresholds)
  assert collapsed.audio_cosine == pytest.approx(1.0)
  assert collapsed.audio_effective_rank == pytest.approx(1.0)
  assert collapsed.text_cosine == pytest.approx(0.0)
  assert collapsed.text_effective_rank == pytest.approx(6.0)
  assert collapsed.collapsed and len(collapsed.reasons) == 2
  healthy = evaluate.collapse_diagnostics(distinct, mask, distinct, mask,
                                          dict(share_at_margin=0.1), thresholds)
  assert not healthy.collapsed
  stuck = evaluate.collapse_diagnostics(distinct, mask, distinct, mask,
                                        dict(share_at_margin=0.9), thresholds)
  assert stuck.reasons == ("share_at_margin 0.900 > 0.5",)
  # hard_cross on the default corpus, epoch 1: every score about the same.
  flat = evaluate.collapse_diagnostics(distinct, mask, distinct, mask,
                                       dict(positive_std=9.9e-5, negative_std=9.7e-5),
                                       thresholds)
  assert flat.reasons == ("score spread 9.9e-05 < 0.001",)
  spread = evaluate.collapse_diagnostics(distinct, mask, distinct, mask,
                                         dict(positive_std=9.9e-5, negative_std=0.006),
                                         thresholds)
  assert not spread.collapsed


def test_mean_pairwise_cosine_matches_pairs():
  x = np.random.default_rng(2).normal(size=(5, 3))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  pairs = [x[i] @ x[j] for i in range(5) for j in range(5) if i != j]
  assert evaluate.mean_pairwise_cosine(x) == pytest.approx(np.mean(pairs))


def test_effective_rank_of_unequal_singular_values_by_hand():
  """Singular values 3 and 1: shares 3/4 and 1/4, exp(-(3/4 ln 3/4 + 1/4 ln 1/4))."""
  by_hand = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
  assert evaluate.effective_rank(np.diag([3.0, 1.0])) == pytest.approx(by_hand, rel=1e-12)
