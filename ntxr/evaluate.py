"""A split's retrieval metrics both ways, all-pairs scoring in jitted chunks, and
feature-collapse diagnostics. The metrics themselves: ntxr.ranking.
"""

import collections
import dataclasses
import functools
from typing import Callable, Iterable, Optional

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from ntxr import parallel, ranking, scores

def both_directions(s: np.ndarray, clip_ids: np.ndarray, caption_ids: np.ndarray) -> dict:
  """{"t2a": ..., "a2t": ...} from s [clips, captions] and the clip id of each side.

  Each direction reports the metrics ranking.T2A and ranking.A2T name.
  """
  relevant = np.asarray(clip_ids)[:, None] == np.asarray(caption_ids)[None, :]
  t2a = ranking.retrieval_metrics(s.T, relevant.T)
  a2t = ranking.retrieval_metrics(s, relevant)
  return {"t2a": {k: t2a[k] for k in ranking.T2A}, "a2t": {k: a2t[k] for k in ranking.A2T}}


def score_histogram(s: np.ndarray, clip_ids: np.ndarray, caption_ids: np.ndarray,
                    bins: int = 50) -> dict:
  """Counts of matching and non-matching scores s [clips, captions] in `bins` equal bins
  over [-1, 1] (scores outside are counted in the end bins).

  Example:
    >>> h = score_histogram(np.array([[1.3, -2.0], [0.1, 0.8]]), [0, 1], [0, 1], bins=4)
    >>> h["edges"], h["positive"], h["negative"]
    ([-1.0, -0.5, 0.0, 0.5, 1.0], [0, 0, 0, 2], [1, 0, 1, 0])
  """
  relevant = np.asarray(clip_ids)[:, None] == np.asarray(caption_ids)[None, :]
  edges = np.linspace(-1, 1, bins + 1)
  count = lambda x: np.histogram(np.clip(x, -1, 1), edges)[0].tolist()
  return dict(edges=edges.tolist(), positive=count(s[relevant]), negative=count(s[~relevant]))


# Products of one evaluation block held at once, per run (`scores.TILINGS`' "blocks"),
# and how many blocks' scores may wait on the device to be read.
EVALUATION_TILE_ELEMENTS = 1 << 26
BLOCKS_IN_FLIGHT = 4


@functools.partial(jax.jit, static_argnames="captions")
def _alignment_sums(audio: jax.Array, words: jax.Array, owner: jax.Array, *,
                    captions: int) -> jax.Array:
  """R runs' `scores.alignment_sums_over_words` in one program: audio [R, n, T, E] (zero
  at masked frames), words [R, K, E], owner [K] -> [R, n, captions]."""
  sums = functools.partial(scores.alignment_sums_over_words, owner=owner, captions=captions,
                           tile_elements=EVALUATION_TILE_ELEMENTS)
  return jax.vmap(lambda x, w: sums(x, None, w))(audio, words)


def _length_chunks(extent: np.ndarray, size: int, multiple: int):
  """Yields (row indices, steps) for chunks of `size` rows of similar extent (last valid
  step + 1): each chunk is cut to its longest row, rounded up to `multiple` so that a
  split compiles only a few shapes."""
  order = np.argsort(extent, kind="stable")
  for start in range(0, len(order), size):
    rows = order[start:start + size]
    yield rows, -(-max(int(extent[rows].max()), 1) // multiple) * multiple


def _word_blocks(text: np.ndarray, text_mask: np.ndarray, budget: int):
  """Yields (caption indices, words [R, budget, E], owner [budget]) from R runs' text
  [R, Q, W, E]: consecutive captions whose valid words fit in `budget` rows, flattened,
  zero rows after them."""
  counts = text_mask.sum(axis=1)
  start = 0
  while start < len(counts):
    if counts[start] > budget:
      raise ValueError(f"caption {start} has {counts[start]} words, more than a word "
                       f"block's {budget}")
    stop = start + int(np.searchsorted(np.cumsum(counts[start:]), budget, "right"))
    owner = np.repeat(np.arange(stop - start), counts[start:stop])
    words = text[:, start:stop][:, text_mask[start:stop]]
    pad = budget - words.shape[1]
    yield (np.arange(start, stop), np.pad(words, [(0, 0), (0, pad), (0, 0)]),
           np.pad(owner, (0, pad)).astype(np.int32))
    start = stop


@dataclasses.dataclass
class Clips:
  """Clips made ready, once, to be scored against any captions (`Clips.scores`), by one
  model or by R runs' models at once (each run's frames of the same clips).

  For the alignment score: chunks of clips of similar length, each cut to its longest
  clip, with zeros at masked frames (so scoring needs no mask), kept on the device
  (scored many times: no copy) or on the host (scored once: one chunk at a time on the
  device); for the pooled score: the clips' pooled embeddings. counts: the valid frames
  of each clip [C]; runs: R, or None for one model's clips (no runs axis).
  """
  score: str
  counts: np.ndarray
  runs: Optional[int]
  chunks: list  # [(clip indices, frames [R, n, steps, E] float32, zero where masked)]
  pooled: Optional[np.ndarray] = None  # [R, C, E]

  @classmethod
  def of(cls, frames: list, masks: list, *, score: str = "alignment", chunk: int = 64,
         frame_multiple: int = 64, on_device: bool = True) -> "Clips":
    """frames: per clip [T_i, E], or [R, T_i, E] for R runs' frames of it (any float
    dtype); masks: per clip [T_i] bool. The alignment chunks hold `chunk` clips, cut to
    the longest rounded up to `frame_multiple` (so a few shapes compile); the last one's
    rows to a multiple of 8; on the device unless `on_device` is False."""
    runs = frames[0].shape[0] if frames and frames[0].ndim == 3 else None
    frames = [f[None] if runs is None else f for f in frames]  # [R, T_i, E] each
    counts = np.array([m.sum() for m in masks], int)
    if frames and scores.get_scorer(score) is scores.SCORERS["pooled"]:
      return cls(score, counts, runs, [], _pooled_runs(frames, masks))
    extent = np.array([np.flatnonzero(m)[-1] + 1 if m.any() else 0 for m in masks])
    chunks = []
    for rows, steps in _length_chunks(extent, chunk, frame_multiple):
      rows_8 = len(rows) + (-len(rows) % 8)
      audio = np.zeros((len(frames[0]), rows_8, steps, frames[0].shape[-1]), np.float32)
      for row, i in enumerate(rows):
        length = min(steps, frames[i].shape[1])
        audio[:, row, :length] = np.where(masks[i][:length, None], frames[i][:, :length], 0)
      chunks.append((rows, jnp.asarray(audio) if on_device else audio))
    return cls(score, counts, runs, chunks)

  def scores(self, text, text_mask, *, word_block: int = 4096) -> np.ndarray:
    """[C, Q] float32 scores against captions text [Q, W, E], text_mask [Q, W]; with
    runs, [R, C, Q] against the runs' embeddings of them, text [R, Q, W, E].

    The alignment score meets blocks of `word_block` caption words (fewer when all the
    captions' words fit in fewer, rounded up to 16) with no word padding, every run in
    one program per (chunk, block); its memory is one [word_block, frames] product per
    clip at a time on a CPU, several clips' on an accelerator (`scores.TILINGS`). Up to
    `BLOCKS_IN_FLIGHT` blocks are queued before the first is read back, so the device
    does not wait on the host."""
    text_mask = np.asarray(text_mask, bool)
    one = self.runs is None  # no runs axis
    text = np.asarray(text)[None] if one else np.asarray(text)
    if self.pooled is not None:
      pooled = np.einsum("rce,rqe->rcq", self.pooled, _pooled_runs(list(text.swapaxes(0, 1)),
                                                                   list(text_mask)))
      return (pooled[0] if one else pooled).astype(np.float32)
    word_block = min(word_block, -(-max(int(text_mask.sum()), 1) // 16) * 16)
    blocks = [(captions, jnp.asarray(words, jnp.float32), jnp.asarray(owner)) for
              captions, words, owner in _word_blocks(text, text_mask, word_block)]
    sums = np.empty((len(text), len(self.counts), len(text_mask)), np.float64)

    def read(clips, captions, block) -> None:
      sums[:, clips[:, None], captions[None, :]] = np.asarray(block)[:, :len(clips),
                                                                      :len(captions)]
    queued = collections.deque()
    for clips, audio in self.chunks:
      audio = jnp.asarray(audio)
      for captions, words, owner in blocks:
        queued.append((clips, captions, _alignment_sums(audio, words, owner,
                                                        captions=word_block)))
        if len(queued) > BLOCKS_IN_FLIGHT:
          read(*queued.popleft())
    while queued:
      read(*queued.popleft())
    counts = self.counts[:, None] * text_mask.sum(axis=1)[None, :]
    s = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0).astype(np.float32)
    return s[0] if one else s


def score_matrix(audio, audio_mask, text, text_mask, *, score: str = "alignment",
                 chunk: int = 64, frame_multiple: int = 64,
                 word_block: int = 4096) -> np.ndarray:
  """All-pairs scores [clips, captions]: see `Clips` for how they run. With R runs'
  embeddings of the same clips and captions (audio [R, C, T, E], text [R, Q, W, E]):
  [R, C, Q], every run's in one program per block. One chunk of clips is on the device
  at a time.

  Args:
    audio: [C, T, E] frame embeddings; audio_mask [C, T] bool.
    text: [Q, W, E] word embeddings; text_mask [Q, W] bool.
  """
  audio, audio_mask = np.asarray(audio), np.asarray(audio_mask, bool)
  frames = list(audio.swapaxes(0, 1)) if audio.ndim == 4 else list(audio)
  clips = Clips.of(frames, list(audio_mask), score=score, chunk=chunk,
                   frame_multiple=frame_multiple, on_device=False)
  return clips.scores(text, text_mask, word_block=word_block)


def _pooled_rows(rows: list, masks: list) -> np.ndarray:
  """Each row's masked mean, L2-normalised: [L_i, E] per row -> [N, E] float64 (zero for
  a row with no valid step)."""
  means = np.stack([x[m].astype(np.float64).sum(axis=0) / max(int(m.sum()), 1)
                    for x, m in zip(rows, masks)])
  norms = np.linalg.norm(means, axis=1, keepdims=True)
  return means / np.where(norms > 0, norms, 1.0)


def _pooled_runs(rows: list, masks: list) -> np.ndarray:
  """`_pooled_rows` of R runs: per row [R, L_i, E] -> [R, N, E]."""
  return np.stack([_pooled_rows([x[run] for x in rows], masks) for run in range(len(rows[0]))])


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


@dataclasses.dataclass(frozen=True)
class Collapse:
  """Signs of feature collapse in a split's embeddings and the training epoch's
  triplets: each modality's mean pairwise cosine and effective rank, and the reasons
  (thresholds crossed), empty if none."""
  audio_cosine: float
  text_cosine: float
  audio_effective_rank: float
  text_effective_rank: float
  reasons: tuple

  @property
  def collapsed(self) -> bool:
    return bool(self.reasons)

  def to_dict(self) -> dict:
    return dict(dataclasses.asdict(self), reasons=list(self.reasons), collapsed=self.collapsed)


def collapse_diagnostics(audio, audio_mask, text, text_mask, training: Optional[dict],
                         thresholds: dict) -> Collapse:
  """Signs of feature collapse, and which cross their thresholds.

  Args:
    audio, audio_mask, text, text_mask: embeddings of a split's clips and captions.
    training: the training epoch's mean statistics ({"share_at_margin",
      "positive_std", "negative_std", ...}, ntxr.steps.TrainingStatistics) or None.
    thresholds: {"cosine", "effective_rank", "share_at_margin", "score_std"}: collapse
      is flagged when either modality's mean pairwise cosine exceeds `cosine`, its
      effective rank falls below `effective_rank`, the share of triplets whose negative
      scores exactly as the positive (loss = margin) exceeds `share_at_margin`, or the
      spread of both positive and negative training scores falls below `score_std`
      (the scores no longer tell pairs apart).
  """
  clips = _pooled_rows(list(audio), list(np.asarray(audio_mask, bool)))
  captions = _pooled_rows(list(text), list(np.asarray(text_mask, bool)))
  found = dict(audio_cosine=mean_pairwise_cosine(clips),
               text_cosine=mean_pairwise_cosine(captions),
               audio_effective_rank=effective_rank(clips),
               text_effective_rank=effective_rank(captions))
  training = training or {}
  reasons = [f"{m}_cosine {found[f'{m}_cosine']:.3f} > {thresholds['cosine']}"
             for m in ("audio", "text") if found[f"{m}_cosine"] > thresholds["cosine"]]
  reasons += [f"{m}_effective_rank {found[f'{m}_effective_rank']:.2f} < "
              f"{thresholds['effective_rank']}" for m in ("audio", "text")
              if found[f"{m}_effective_rank"] < thresholds["effective_rank"]]
  if training.get("share_at_margin", 0) > thresholds["share_at_margin"]:
    reasons.append(f"share_at_margin {training['share_at_margin']:.3f} > "
                   f"{thresholds['share_at_margin']}")
  spread = max(training.get("positive_std", np.inf), training.get("negative_std", np.inf))
  if spread < thresholds["score_std"]:
    reasons.append(f"score spread {spread:.2g} < {thresholds['score_std']:g}")
  return Collapse(**found, reasons=tuple(reasons))


@dataclasses.dataclass
class SplitEmbeddings:
  """A split's embeddings: clips [C, T, E] + mask, captions [Q, W, E] + mask, and the
  clip id of each clip and each caption."""
  audio: np.ndarray
  audio_mask: np.ndarray
  clip_ids: np.ndarray
  text: np.ndarray
  text_mask: np.ndarray
  caption_ids: np.ndarray


def embed_rows(embed: Callable, batches: Iterable[dict], inputs: tuple, size: int,
               devices: parallel.Devices) -> tuple:
  """(embeddings [N, L, E], mask [N, L], audio_id [N]) of every row of `batches`.

  embed(sharded inputs) -> [size, L, E]. Each numpy batch is padded to `size` rows so
  one shape compiles once, and split over the devices; steps are padded to the longest
  batch's.
  """
  embedded, masks, ids = [], [], []
  for batch in batches:
    rows = len(batch["audio_id"])
    padded = [np.pad(batch[k], [(0, size - rows)] + [(0, 0)] * (batch[k].ndim - 1))
              for k in inputs]
    out = embed(devices.shard(tuple(padded)))
    embedded.append(np.asarray(multihost_utils.process_allgather(out, tiled=True))[:rows])
    masks.append(batch[inputs[1]])
    ids.append(batch["audio_id"])
  steps = max(m.shape[1] for m in masks)
  pad = lambda x: np.pad(x, [(0, 0), (0, steps - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
  return (np.concatenate([pad(e) for e in embedded]), np.concatenate([pad(m) for m in masks]),
          np.concatenate(ids))


def runs_scores(splits: list, score: str) -> np.ndarray:
  """All-pairs scores [R, clips, captions] of one split embedded by R runs' models (the
  same clips and captions, masks and ids: only the embeddings differ), every run's in one
  program per block. Unchecked: see `finite_scores`."""
  stacked = lambda name: np.stack([getattr(split, name) for split in splits])
  first = splits[0]
  return score_matrix(stacked("audio"), first.audio_mask, stacked("text"), first.text_mask,
                      score=score)


def finite_scores(split: SplitEmbeddings, s: np.ndarray) -> np.ndarray:
  """s, the scores of the split's embeddings, once both are known finite;
  FloatingPointError otherwise (XLA's CPU max, and so relu and a hinge, may turn a NaN
  into 0, so the scores alone would not tell)."""
  if not (np.isfinite(split.audio).all() and np.isfinite(split.text).all()):
    raise FloatingPointError("the model's embeddings became NaN or infinite")
  if not np.isfinite(s).all():
    raise FloatingPointError("retrieval scores became NaN or infinite")
  return s


def report(name: str, results: dict, path: str) -> str:
  """What `ntxr.main` prints as a run ends: the run `name`'s epochs and reported
  checkpoint, the clips left out, the table of its `results` (results.json's) and where
  they are (`path`)."""
  stopped = ", stopped on a plateau" if results.get("stopped_early") else ""
  lines = [f"{name} on {results['split']} (epochs {results['epochs']}{stopped}, best "
           f"{results['best_epoch']} by {results['selected_by']}, {results['seconds']:.0f} s "
           f"training; reported checkpoint collapsed: {results['collapse']}, epochs flagged: "
           f"{results['collapse_epochs'] or 'none'})"]
  if results["skipped"]["count"]:
    lines.append(f"{results['skipped']['count']} clips or rows left out when preparing the "
                 "data: " + "; ".join(results["skipped"]["entries"]))
  return "\n".join([*lines, format_table(results), f"results: {path}"])


def format_table(results: dict) -> str:
  """A printed table of both directions' metrics, with text-to-audio against several
  relevant clips (t2a_multi) and against graded ratings (t2a_graded) where measured."""
  columns = ranking.A2T + ("mAP@16",)
  lines = ["direction " + " ".join(f"{c:>7}" for c in columns)]
  for direction in ("t2a", "a2t", "t2a_multi"):
    if direction not in results:
      continue
    row = results[direction]
    same = lambda c: f"{'=R@' + c[3:]:>7}" if direction == "t2a" and c[:2] == "HR" else "      -"
    lines.append(f"{direction:<9} " + " ".join(
        f"{row[c]:7.3f}" if c in row else same(c) for c in columns))
  if "t2a_graded" in results:
    graded = results["t2a_graded"]
    lines.append("t2a against people's ratings: " + ", ".join(
        f"{k} {v:.3f}" for k, v in graded.items() if k.startswith("nDCG"))
                 + f" ({graded['queries']} rated queries)")
  return "\n".join(lines)
