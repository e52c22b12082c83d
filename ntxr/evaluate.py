"""Retrieval metrics, all-pairs scoring in jitted chunks, feature-collapse diagnostics.

Conventions (the README's evaluation section): per query, R@k is the share of its relevant items in the top
k, HR@k whether any is, mAP the mean of full average precision and mAP@10 the DCASE
truncated one, AP@10 = sum_{i<=10} P@i rel_i / min(#relevant, 10). Ties rank the
lower index first.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntxr import scores

KS = (1, 5, 10)


def retrieval_metrics(score: np.ndarray, relevant: np.ndarray, ks=KS) -> dict:
  """Metrics of ranking each query's items by score.

  Args:
    score: [Q, D] float, higher is better.
    relevant: [Q, D] bool; every query needs at least one relevant item.
  Returns:
    {"R@k", "HR@k" for k in ks, "mAP", "mAP@10"}: floats averaged over queries.

  Example:
    >>> m = retrieval_metrics(np.array([[.1, .9, .5]]), np.array([[True, False, True]]))
    >>> m["R@1"], m["HR@5"], round(m["mAP"], 4), round(m["mAP@10"], 4)
    (0.0, 1.0, 0.5833, 0.5833)
  """
  score, relevant = np.asarray(score, np.float64), np.asarray(relevant, bool)
  if score.shape != relevant.shape or score.ndim != 2:
    raise ValueError(f"score {score.shape} and relevant {relevant.shape} must be one [Q, D]")
  count = relevant.sum(axis=1)
  if not count.all():
    raise ValueError(f"query {int(np.argmin(count))} has no relevant item")
  if not np.isfinite(score).all():
    raise FloatingPointError("scores hold NaN or infinity")
  order = np.argsort(-score, axis=1, kind="stable")
  hits = np.take_along_axis(relevant, order, axis=1)
  precision = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
  metrics = {}
  for k in ks:
    metrics[f"R@{k}"] = float(np.mean(hits[:, :k].sum(axis=1) / count))
    metrics[f"HR@{k}"] = float(np.mean(hits[:, :k].any(axis=1)))
  metrics["mAP"] = float(np.mean((precision * hits).sum(axis=1) / count))
  metrics["mAP@10"] = float(np.mean(
      (precision[:, :10] * hits[:, :10]).sum(axis=1) / np.minimum(count, 10)))
  return metrics


def both_directions(s: np.ndarray, clip_ids: np.ndarray, caption_ids: np.ndarray) -> dict:
  """{"t2a": ..., "a2t": ...} from s [clips, captions] and the clip id of each side.

  Text-to-audio has one relevant clip per caption, so its R@k = HR@k and it reports R@k;
  audio-to-text reports both conventions.
  """
  relevant = np.asarray(clip_ids)[:, None] == np.asarray(caption_ids)[None, :]
  t2a = retrieval_metrics(s.T, relevant.T)
  return {"t2a": {k: v for k, v in t2a.items() if not k.startswith("HR")},
          "a2t": retrieval_metrics(s, relevant)}


def score_histogram(s: np.ndarray, clip_ids: np.ndarray, caption_ids: np.ndarray,
                    bins: int = 50) -> dict:
  """Counts of matching and non-matching scores s [clips, captions] in `bins` equal bins
  over [-1, 1] (scores outside are counted in the end bins).

  Example:
    >>> h = score_histogram(np.array([[0.9, -0.5], [0.1, 0.8]]), [0, 1], [0, 1], bins=4)
    >>> h["edges"], h["positive"], h["negative"]
    ([-1.0, -0.5, 0.0, 0.5, 1.0], [0, 0, 0, 2], [0, 1, 1, 0])
  """
  relevant = np.asarray(clip_ids)[:, None] == np.asarray(caption_ids)[None, :]
  edges = np.linspace(-1, 1, bins + 1)
  count = lambda x: np.histogram(np.clip(x, -1, 1), edges)[0].tolist()
  return dict(edges=edges.tolist(), positive=count(s[relevant]), negative=count(s[~relevant]))


@functools.partial(jax.jit, static_argnames=("score",))
def _score_chunk(audio, audio_mask, text, text_mask, *, score):
  return scores.get_scorer(score).matrix(audio, text, audio_mask, text_mask)


def _length_chunks(mask: np.ndarray, size: int, multiple: int):
  """Yields (row indices, steps) for chunks of `size` rows of similar length.

  Rows are sorted by extent (last valid step + 1); each chunk is cut to its longest
  row, rounded up to `multiple` so that a split compiles only a few shapes.
  """
  extent = (mask * np.arange(1, mask.shape[1] + 1)).max(axis=1)
  order = np.argsort(extent, kind="stable")
  for start in range(0, len(order), size):
    rows = order[start:start + size]
    steps = -(-max(int(extent[rows].max()), 1) // multiple) * multiple
    yield rows, min(steps, mask.shape[1])


def score_matrix(audio, audio_mask, text, text_mask, *, score: str = "alignment",
                 chunk: int = 64, caption_chunk: int = 512, frame_multiple: int = 64,
                 word_multiple: int = 8) -> np.ndarray:
  """All-pairs scores [clips, captions], in blocks of `chunk` clips x `caption_chunk`
  captions of similar lengths, each block cut to its longest clip and caption, so
  padding costs little (a few block shapes compile).

  Args:
    audio: [C, T, E] frame embeddings; audio_mask [C, T] bool.
    text: [Q, W, E] word embeddings; text_mask [Q, W] bool.
  """
  audio_mask, text_mask = np.asarray(audio_mask, bool), np.asarray(text_mask, bool)
  caption_blocks = []
  for rows, words in _length_chunks(text_mask, caption_chunk, word_multiple):
    pad = [(0, caption_chunk - len(rows))]
    caption_blocks.append((rows, jnp.asarray(np.pad(text[rows, :words], pad + [(0, 0)] * 2)),
                           jnp.asarray(np.pad(text_mask[rows, :words], pad + [(0, 0)]))))
  out = np.empty((audio.shape[0], text.shape[0]), np.float32)
  for clips, frames in _length_chunks(audio_mask, chunk, frame_multiple):
    pad = [(0, chunk - len(clips))]
    a = jnp.asarray(np.pad(audio[clips, :frames], pad + [(0, 0), (0, 0)]))
    m = jnp.asarray(np.pad(audio_mask[clips, :frames], pad + [(0, 0)]))
    for captions, t, t_mask in caption_blocks:
      block = np.asarray(_score_chunk(a, m, t, t_mask, score=score))
      out[np.ix_(clips, captions)] = block[:len(clips), :len(captions)]
  return out


def _pooled(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Masked mean over steps, L2-normalised: [N, T, E] -> [N, E] float64."""
  return np.asarray(scores.pooled_embeddings(jnp.asarray(x), jnp.asarray(mask)), np.float64)


def mean_pairwise_cosine(x: np.ndarray) -> float:
  """Mean cosine over distinct pairs of the unit rows of x [N, E]."""
  n = x.shape[0]
  total = np.square(x.sum(axis=0)).sum() - np.square(x).sum()
  return float(total / (n * (n - 1)))


def effective_rank(x: np.ndarray) -> float:
  """exp(entropy of the normalised singular values) of x [N, E] (Roy and Vetterli, 2007)."""
  singular = np.linalg.svd(x, compute_uv=False)
  p = singular / max(singular.sum(), 1e-12)
  p = p[p > 0]
  return float(np.exp(-(p * np.log(p)).sum()))


def collapse_diagnostics(audio, audio_mask, text, text_mask, triplets: Optional[dict],
                         thresholds: dict) -> dict:
  """Signs of feature collapse, and whether any crosses its threshold.

  Args:
    audio, audio_mask, text, text_mask: embeddings of a split's clips and captions.
    triplets: the training epoch's {"share_zero_loss", "share_at_margin", ...} or None.
    thresholds: {"cosine", "effective_rank", "share_at_margin", "score_std"}: collapse
      is flagged when either modality's mean pairwise cosine exceeds `cosine`, its
      effective rank falls below `effective_rank`, the share of triplets whose negative
      scores exactly as the positive (loss = margin) exceeds `share_at_margin`, or the
      spread of both positive and negative training scores falls below `score_std`
      (the scores no longer tell pairs apart).
  """
  clips, captions = _pooled(audio, audio_mask), _pooled(text, text_mask)
  found = dict(audio_cosine=mean_pairwise_cosine(clips),
               text_cosine=mean_pairwise_cosine(captions),
               audio_effective_rank=effective_rank(clips),
               text_effective_rank=effective_rank(captions),
               **(triplets or {}))
  reasons = [f"{m}_cosine {found[f'{m}_cosine']:.3f} > {thresholds['cosine']}"
             for m in ("audio", "text") if found[f"{m}_cosine"] > thresholds["cosine"]]
  reasons += [f"{m}_effective_rank {found[f'{m}_effective_rank']:.2f} < "
              f"{thresholds['effective_rank']}" for m in ("audio", "text")
              if found[f"{m}_effective_rank"] < thresholds["effective_rank"]]
  if found.get("share_at_margin", 0) > thresholds["share_at_margin"]:
    reasons.append(f"share_at_margin {found['share_at_margin']:.3f} > "
                   f"{thresholds['share_at_margin']}")
  spread = max(found.get("positive_std", np.inf), found.get("negative_std", np.inf))
  if spread < thresholds["score_std"]:
    reasons.append(f"score spread {spread:.2g} < {thresholds['score_std']:g}")
  return dict(found, collapse=bool(reasons), collapse_reasons=reasons)


def format_table(results: dict) -> str:
  """A printed table of both directions' metrics."""
  columns = ["R@1", "R@5", "R@10", "HR@1", "HR@5", "HR@10", "mAP@10", "mAP"]
  lines = ["direction " + " ".join(f"{c:>7}" for c in columns)]
  for direction in ("t2a", "a2t"):
    row = results[direction]
    lines.append(f"{direction:<9} " + " ".join(
        f"{row[c]:7.3f}" if c in row else f"{'=R@' + c[3:]:>7}" for c in columns))
  return "\n".join(lines)
