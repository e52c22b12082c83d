"""False negatives: captions of other clips that describe the same sounds.

A batch's captions are compared on the host (NumPy), from a source the user names
(`settings.SIMILARITIES`): TF-IDF over the training captions' tokens, the mean of the frozen
word vectors, or the built-in corpus's events. In the step (JAX) that similarity
filters each anchor's pool and gives the "soft" objective its relevance; and where the
corpus knows each clip's events, the step measures how much of the negatives' weight
lands on clips with exactly the anchor clip's set of event kinds (false negatives).

How well a caption rule finds the clips people hear as matching is measured on the TAU
graded relevances (`judged_rules`), and by the command:

  python -m ntxr.false_negatives --relevance_dir=tau_relevances [--word_vectors=FILE]
"""

import collections
import os
import tempfile
from typing import Callable, Optional, Union

from ntxr import ctrl_c

if __name__ == "__main__":  # first: a Ctrl-C while the imports below load costs one line
  ctrl_c.exit_at_once(ctrl_c.AGAIN)

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from ntxr import command, files, relevance as relevance_lib, sampling
from ntxr.configs import default
from ntxr.data import tokenizer as tokenizer_lib, word_vectors as word_vectors_lib
# pylint: enable=wrong-import-position

FLAGS = flags.FLAGS
# How a candidate clip's captions answer a query: each caption on its own (as the filter
# sees the one caption a batch holds), or their maximum or mean similarity.
COMBINED = ("caption", "max", "mean")
TARGET_PRECISION = 0.8
# Bands of caption similarity s the relevance map is compared with people in: s <= 0.1,
# 0.1 < s <= 0.2, ..., s > 0.5 (the last is "above" the default --threshold).
BANDS = (0.1, 0.2, 0.3, 0.4, 0.5)

Array = jax.Array


def inverse_document_frequency(token_lists, vocab_size: int) -> np.ndarray:
  """idf [V] over captions given as token-id sequences: log((1 + n) / (1 + df)) + 1."""
  df = np.zeros(vocab_size)
  for tokens in token_lists:
    df[np.unique(np.asarray(tokens, np.int64))] += 1
  return np.log((1 + len(token_lists)) / (1 + df)) + 1


def unit_rows(vectors: np.ndarray) -> np.ndarray:
  """[B, D] -> [B, D] each row over its norm (a zero row stays zero)."""
  norms = np.linalg.norm(vectors, axis=1, keepdims=True)
  return vectors / np.where(norms > 0, norms, 1)


def cosine(vectors: np.ndarray) -> np.ndarray:
  """[B, D] -> [B, B] cosine similarity (0 for a zero vector)."""
  unit = unit_rows(vectors)
  return (unit @ unit.T).astype(np.float32)


def tfidf_vectors(tokens: np.ndarray, token_mask: np.ndarray, idf: np.ndarray) -> np.ndarray:
  """The captions' TF-IDF vectors: tokens [B, W] int, token_mask [B, W] -> [B, V]."""
  counts = np.zeros((tokens.shape[0], idf.shape[0]))
  rows = np.broadcast_to(np.arange(tokens.shape[0])[:, None], tokens.shape)
  np.add.at(counts, (rows[token_mask], tokens[token_mask]), 1)
  return counts * idf


def word_vector_sums(tokens: np.ndarray, token_mask: np.ndarray,
                     table: np.ndarray) -> np.ndarray:
  """The sums of the captions' word vectors (their means' direction): table [V, E] ->
  [B, E]."""
  return np.einsum("bw,bwe->be", token_mask.astype(np.float64), table[tokens])


def tfidf_similarity(tokens: np.ndarray, token_mask: np.ndarray, idf: np.ndarray) -> np.ndarray:
  """Cosine of the captions' TF-IDF vectors: tokens [B, W] int, token_mask [B, W] -> [B, B]."""
  return cosine(tfidf_vectors(tokens, token_mask, idf))


def word_vector_similarity(tokens: np.ndarray, token_mask: np.ndarray,
                           table: np.ndarray) -> np.ndarray:
  """Cosine of the captions' mean word vectors: table [V, E] -> [B, B]."""
  return cosine(word_vector_sums(tokens, token_mask, table))


def event_similarity(events: Union[np.ndarray, Array],
                     others: Union[np.ndarray, Array, None] = None):
  """Jaccard similarity of the captions' clips' event kinds: events [B, K] bool, and
  others' [M, K] (default: the same) -> [B, M] float32, NumPy's or JAX's as given (the
  counts are whole numbers: exact at any matmul precision)."""
  others = events if others is None else others
  events, others = events.astype(np.float32), others.astype(np.float32)
  shared = events @ others.T  # whole counts: exact in float32
  union = events.sum(1)[:, None] + others.sum(1)[None, :] - shared
  return shared / (union + (union == 0))


def similarity_to(kind: str, mine: Array, others: Array) -> Array:
  """[n, M]: the similarity `kind` (`settings.SIMILARITIES`) of n captions to M others,
  each given as its unit caption vector (tfidf, word_vectors: `CaptionRelations`'
  caption_vectors) or its clip's event kinds (events), as the host compares a batch's."""
  if kind == "events":
    return event_similarity(mine, others)
  return jnp.matmul(mine, others.T, precision=jax.lax.Precision.HIGHEST)  # not TF32's


def filter_pool(pool: Array, s_cross: Array, similarity: Optional[Array], *,
                max_similarity: float, max_share_of_positive: float) -> Array:
  """Anchor i's pool [N, N] bool without the candidates j whose caption is more similar
  to i's than max_similarity, or whose cross score with i (either direction) is above
  max_share_of_positive times i's positive score (NV-Retriever's TopK-PercPos). A
  bound of 0 is off."""
  rows = sampling.whole_rows(s_cross, True, pool.shape[0]) if max_share_of_positive > 0 else None
  return filter_rows(pool, rows, similarity, max_similarity=max_similarity,
                     max_share_of_positive=max_share_of_positive)


def filter_rows(pool: Array, rows: Optional[sampling.Rows], similarity: Optional[Array], *,
                max_similarity: float, max_share_of_positive: float,
                candidates_positive: Optional[Array] = None) -> Array:
  """`filter_pool` on the anchors' rows: pool [n, G] bool, rows the cross scores' (None
  where max_share_of_positive is 0), similarity [n, G] the anchors' captions' rows.
  candidates_positive [G]: every anchor's positive score; given, the rows are those of
  the filtered pool's transpose (each candidate bounded by its own positive)."""
  drop = jnp.zeros_like(pool)
  if max_similarity > 0:
    if similarity is None:
      raise ValueError("filtering by caption similarity needs a similarity source")
    drop = drop | (similarity > max_similarity)
  if max_share_of_positive > 0:
    bound = max_share_of_positive * (rows.positive[:, None] if candidates_positive is None
                                     else candidates_positive[None, :])
    drop = drop | (rows.by_text > bound) | (rows.by_audio > bound)
  return pool & ~drop


def relevance(similarity: Array, positives: Array, slope: float, offset: float) -> Array:
  """Soft relevance [N, N]: 1 on positives, sigmoid(slope * similarity - offset) elsewhere."""
  return jnp.where(positives, 1.0, jax.nn.sigmoid(slope * similarity - offset))


def same_events(events: Array, others: Optional[Array] = None) -> Array:
  """[n, K] bool event kinds, and others' [G, K] (default: the same) -> [n, G] bool: the
  two clips have exactly the same kinds."""
  others = events if others is None else others
  return jnp.all(events[:, None, :] == others[None, :, :], axis=-1)


def chance_share(kinds) -> float:
  """The false-negative share of a uniformly random negative: over a split's clips (each
  given as its event kinds), the share of (clip, other clip) pairs with the same kinds."""
  counts = collections.Counter(frozenset(k) for k in kinds)
  n = sum(counts.values())
  return sum(c * (c - 1) for c in counts.values()) / max(n * (n - 1), 1)


def measured_shares(weights: Array, pool: Array, kept: Array, false: Array,
                    mean=sampling.masked_mean) -> dict:
  """Scalars measured against ground truth.

  Args:
    weights: [2, N, N] each anchor's weight on its negatives (caption anchors over clips,
      audio anchors over captions), rows summing to 1 (0 for an anchor without any).
    pool: [N, N] bool every other clip; kept: [N, N] bool what the filter left of it.
    false: [N, N] bool, candidate j is a false negative for anchor i.
    mean: (values, mask) -> the mean where mask holds (over a sharded batch's anchor
      rows, every device's).

  Returns:
    false_negative_share: the mean (over anchors with negatives) weight on false
      negatives; filtered_share: the share of the pool the filter removed;
      filtered_false_share: the share of those removed that were false negatives.
  """
  has = weights.sum(axis=-1) > 0
  per_anchor = jnp.sum(weights * false[None], axis=-1)
  removed = pool & ~kept
  return dict(false_negative_share=mean(per_anchor, has),
              filtered_share=mean(removed.astype(jnp.float32), pool),
              filtered_false_share=mean(false.astype(jnp.float32), removed))


def rated_candidates(tau: relevance_lib.TauSplit, similarity_of: Callable,
                     group: str = "C15") -> dict:
  """{combined: (similarities [P], ratings [P])} of every rated clip of `group` ("C15":
  the 15 candidates, "TN": the random clip) of every query; similarity_of(texts) -> [T, T]
  compares captions."""
  found = {name: ([], []) for name in COMBINED}
  for query, groups in tau.ratings.items():
    candidates = [f for f in groups if tau.groups[query][f] == group]
    texts = [query] + [c for f in candidates for c in tau.captions[f]]
    row = similarity_of(texts)[0]
    start = 1
    for name in candidates:
      count = len(tau.captions[name])
      each = row[start:start + count]
      start += count
      for combined, values in (("caption", each), ("max", [each.max()]),
                               ("mean", [each.mean()])):
        found[combined][0].extend(values)
        found[combined][1].extend([groups[name]] * len(values))
  return {k: (np.asarray(v[0], np.float64), np.asarray(v[1], np.float64))
          for k, v in found.items()}


def roc_auc(score: np.ndarray, label: np.ndarray) -> float:
  """The probability that a positive outscores a negative, ties counting half
  (Mann-Whitney U / (positives x negatives)).

  Example:
    >>> roc_auc(np.array([0.9, 0.5, 0.5, 0.1]), np.array([True, True, False, False]))
    0.875
  """
  label = np.asarray(label, bool)
  order = np.argsort(score, kind="stable")
  ranks = np.empty(len(score))
  sorted_score = np.asarray(score)[order]
  _, first, counts = np.unique(sorted_score, return_index=True, return_counts=True)
  for start, count in zip(first, counts):  # ties share their mean rank
    ranks[order[start:start + count]] = start + (count + 1) / 2
  positives, negatives = label.sum(), (~label).sum()
  return float((ranks[label].sum() - positives * (positives + 1) / 2)
               / (positives * negatives))


def at_threshold(score: np.ndarray, label: np.ndarray, threshold: float) -> dict:
  """Precision, recall and the share flagged when a similarity above `threshold`
  flags a pair (as the filter drops it)."""
  flagged, label = np.asarray(score) > threshold, np.asarray(label, bool)
  hits = (flagged & label).sum()
  return dict(precision=float(hits / flagged.sum()) if flagged.any() else float("nan"),
              recall=float(hits / max(label.sum(), 1)), flagged=float(flagged.mean()))


def threshold_for_precision(score: np.ndarray, label: np.ndarray,
                            target: float = TARGET_PRECISION) -> Optional[float]:
  """The lowest threshold t (a value of score) whose flagged pairs (score > t) reach
  precision `target`, so the most recall at that precision; None if none does."""
  for threshold in np.unique(score):  # rising
    flagged = score > threshold
    if flagged.any() and (label[flagged]).mean() >= target:
      return float(threshold)
  return None


def by_band(score: np.ndarray, rating: np.ndarray, slope: float, offset: float,
            edges: tuple = BANDS) -> list:
  """The relevance map against people in bands of similarity, score [P] and rating [P]
  (0-100) split at `edges` (a band holds edges[i - 1] < s <= edges[i]; the first is
  unbounded below, the last above): per band, its edges (None where unbounded), pairs,
  the map's mean and people's mean rating / 100 (None where the band is empty)."""
  score, rating = np.asarray(score, np.float64), np.asarray(rating, np.float64)
  band = np.searchsorted(np.asarray(edges, np.float64), score, side="left")
  bounds = [None, *edges, None]
  found = []
  for i in range(len(edges) + 1):
    inside = band == i
    mapped = np.asarray(relevance(score[inside], np.zeros(inside.sum(), bool), slope, offset))
    found.append(dict(low=bounds[i], high=bounds[i + 1], pairs=int(inside.sum()),
                      mapped=float(mapped.mean()) if inside.any() else None,
                      rated=float(rating[inside].mean() / 100) if inside.any() else None))
  return found


def _similarity_rules(fit: relevance_lib.TauSplit, folder: str, tokens: str,
                      vocab_size: int, vectors: Optional[str]) -> dict:
  """{rule name: similarity_of(texts) -> [T, T]}: TF-IDF (idf and tokenizer from the fit
  split's captions), and the mean word vectors when a vectors file is given."""
  captions = [c for texts in fit.captions.values() for c in texts]
  if tokens == "words" or vectors:
    tok = tokenizer_lib.WordTokenizer(tokenizer_lib.train_words(
        captions, os.path.join(folder, "words.txt")))
  else:
    tok = tokenizer_lib.Tokenizer(tokenizer_lib.train(
        captions, os.path.join(folder, "spm.model"), vocab_size))
  idf = inverse_document_frequency([tok.encode(c) for c in captions], tok.vocab_size)

  def encoded(texts):
    ids = [tok.encode(t) for t in texts]
    width = max(1, max(len(i) for i in ids))
    padded = np.array([np.pad(i, (0, width - len(i))) for i in ids], np.int64)
    return padded, padded != tokenizer_lib.PAD_ID
  rules = {"tfidf": lambda texts: tfidf_similarity(*encoded(texts), idf)}
  if vectors:
    table, _ = word_vectors_lib.read_word2vec(vectors, tok.words)
    rules["word_vectors"] = lambda texts: word_vector_similarity(*encoded(texts), table)
  return rules


def judged_rules(folder: str, *, relevance_map: tuple, fit_split: str = "development",
                 report_split: str = "evaluation", threshold: float = 0.5,
                 tokens: str = "sentencepiece", vocab_size: int = 1000,
                 vectors: Optional[str] = None) -> list:
  """Every caption-similarity rule measured against people's ratings (TAU's 15 rated
  candidates per query; a match is a rating of at least 50).

  Returns one row per rule and way of combining a clip's captions (`COMBINED`): on
  both splits, ROC AUC and precision, recall and share flagged at `threshold`; the
  threshold that reaches TARGET_PRECISION on the fit split, and its precision, recall
  and share flagged on the report split; and, per split, how the soft objective's
  relevance map (`relevance` with (slope, offset) = `relevance_map`) compares with
  people's ratings / 100: its mean against theirs over the rated random clips (what
  most in-batch negatives are), over the candidates above `threshold`, and over each in
  bands of similarity (`by_band`).
  """
  splits = {name: relevance_lib.read_tau(folder, name) for name in (fit_split, report_split)}
  with tempfile.TemporaryDirectory() as scratch:
    rules = _similarity_rules(splits[fit_split], scratch, tokens, vocab_size, vectors)
    measured = {(rule, split): rated_candidates(tau, similarity_of)
                for rule, similarity_of in rules.items() for split, tau in splits.items()}
    random_clips = {(rule, split): rated_candidates(tau, similarity_of, "TN")
                    for rule, similarity_of in rules.items() for split, tau in splits.items()}
  slope, offset = relevance_map
  mapped = lambda score: float(np.mean(relevance(score, np.zeros(score.shape, bool),
                                                 slope, offset)))
  matches = lambda rating: rating >= relevance_lib.RELEVANT_RATING
  rows = []
  for rule in rules:
    for combined in COMBINED:
      row = dict(rule=rule, combined=combined)
      score, rating = measured[rule, fit_split][combined]
      fitted = threshold_for_precision(score, matches(rating))
      for role, split in (("fit", fit_split), ("report", report_split)):
        score, rating = measured[rule, split][combined]
        matched = matches(rating)
        row[role] = dict(split=split, pairs=len(score), matched=float(matched.mean()),
                         roc_auc=roc_auc(score, matched),
                         at_threshold=dict(threshold=threshold,
                                           **at_threshold(score, matched, threshold)))
        random_score, random_rating = random_clips[rule, split][combined]
        above = score > threshold
        row[role]["relevance_map"] = dict(
            slope=slope, offset=offset,
            random=dict(mapped=mapped(random_score),
                        rated=float(random_rating.mean() / 100)),
            above_threshold=dict(mapped=mapped(score[above]),
                                 rated=float(rating[above].mean() / 100))
            if above.any() else None,
            bands=dict(candidates=by_band(score, rating, slope, offset),
                       random=by_band(random_score, random_rating, slope, offset)))
        row[role]["at_fitted"] = None if fitted is None else dict(
            threshold=fitted, **at_threshold(score, matched, fitted))
      rows.append(row)
  return rows


def format_rules(rows: list) -> str:
  """The rows of `judged_rules` as a printed table."""
  lines = [f"{'rule':<13}{'captions':<9}{'split':<12}{'AUC':>6}  {'P@t':>5} {'R@t':>5} "
           f"{'flag@t':>6}  {'t(P>=0.8)':>9} {'P':>5} {'R':>5} {'flag':>5}  "
           f"relevance map vs people: random clips, above t"]
  for row in rows:
    for role in ("fit", "report"):
      m = row[role]
      fixed, fitted, mapped = m["at_threshold"], m["at_fitted"], m["relevance_map"]
      tail = (f"{fitted['threshold']:9.3f} {fitted['precision']:5.2f} {fitted['recall']:5.2f} "
              f"{fitted['flagged']:5.3f}" if fitted else f"{'none':>9} {'-':>5} {'-':>5} {'-':>5}")
      above = mapped["above_threshold"]
      lines.append(
          f"{row['rule']:<13}{row['combined']:<9}{m['split']:<12}{m['roc_auc']:6.3f}  "
          f"{fixed['precision']:5.2f} {fixed['recall']:5.2f} {fixed['flagged']:6.3f}  {tail}  "
          f"{mapped['random']['mapped']:.3f} vs {mapped['random']['rated']:.3f}, "
          + (f"{above['mapped']:.3f} vs {above['rated']:.3f}" if above else "-"))
  return "\n".join(lines + _band_lines(rows))


def _band_lines(rows: list) -> list:
  """The relevance map against people by band of similarity (`by_band`), printed: a
  title, a header and one line per rule, split and group of clips."""
  name = lambda b: (f"s<={b['high']:g}" if b["low"] is None else f"s>{b['low']:g}"
                    if b["high"] is None else f"{b['low']:g}-{b['high']:g}")
  first = rows[0]["fit"]["relevance_map"]["bands"]["candidates"]
  lines = ["", "relevance map / people's mean rating / 100, and pairs, by caption similarity s",
           f"{'rule':<13}{'captions':<9}{'split':<12}{'clips':<10}"
           + "".join(f"{name(b):>18}" for b in first)]
  for row in rows:
    for role in ("fit", "report"):
      for clips, bands in row[role]["relevance_map"]["bands"].items():
        lines.append(f"{row['rule']:<13}{row['combined']:<9}{row[role]['split']:<12}{clips:<10}"
                     + "".join(f"{b['mapped']:.3f}/{b['rated']:.3f} {b['pairs']:5d}".rjust(18)
                               if b["pairs"] else f"{'-':>18}" for b in bands))
  return lines


def define_flags() -> None:
  """This command's flags (defined where it starts, not when the module is imported)."""
  flags.DEFINE_string("relevance_dir", None, "the TAU graded relevances' folder "
                      "(SPLIT_relevances.csv, SPLIT_text.csv, SPLIT_audio_metadata.csv)")
  flags.DEFINE_string("fit_split", "development", "the split thresholds and maps are fit on")
  flags.DEFINE_string("report_split", "evaluation", "the split they are reported on")
  config = default.get_config()
  crossing = config.relevance_offset / config.relevance_slope
  flags.DEFINE_float("threshold", crossing,
                     "a similarity above this flags a pair, as --config.filter_similarity "
                     f"drops it. That filter defaults to {config.filter_similarity:g}, off "
                     "(no threshold on a caption's similarity finds people's matches "
                     "precisely enough: docs/results.md), so this defaults to where the soft "
                     "objective's relevance map crosses 1/2, the config's relevance_offset / "
                     f"relevance_slope = {crossing:g}")
  flags.DEFINE_float("relevance_slope", config.relevance_slope,
                     "the soft objective's relevance map: slope")
  flags.DEFINE_float("relevance_offset", config.relevance_offset,
                     "the soft objective's relevance map: offset")
  flags.DEFINE_enum("tokens", "sentencepiece", ["sentencepiece", "words"], "TF-IDF's tokens")
  flags.DEFINE_integer("vocab_size", 1000, "sentencepiece pieces")
  flags.DEFINE_string("word_vectors", None, "a word2vec file: adds the word-vector rule")
  flags.DEFINE_string("output_json", None, "also write the rows here as JSON")


def main(argv):
  command.start(argv)
  if not FLAGS.relevance_dir:
    command.exit_with("--relevance_dir: give the folder of TAU's ratings", 2)
  for flag in ("relevance_dir", "word_vectors"):
    path = FLAGS[flag].value
    if path and not os.path.exists(path):
      command.exit_with(f"--{flag}={path}: not found", 2)
  if not os.path.isdir(FLAGS.relevance_dir):
    command.exit_with(f"--relevance_dir={FLAGS.relevance_dir}: a file, not a folder", 2)
  splits = relevance_lib.tau_splits(FLAGS.relevance_dir)
  for flag in ("fit_split", "report_split"):
    if FLAGS[flag].value not in splits:
      command.exit_with(f"--{flag}={FLAGS[flag].value}: {FLAGS.relevance_dir} holds no such "
                        f"split's ratings (SPLIT_relevances.csv); it holds "
                        f"{', '.join(splits) or 'none'}", 2)
  if FLAGS.output_json:
    try:
      files.check_output("output_json", FLAGS.output_json,
                         dict(word_vectors=FLAGS.word_vectors), data_dir=FLAGS.relevance_dir)
    except ValueError as error:
      command.exit_with(error, 2)
  try:
    rows = judged_rules(FLAGS.relevance_dir, fit_split=FLAGS.fit_split,
                        report_split=FLAGS.report_split, threshold=FLAGS.threshold,
                        relevance_map=(FLAGS.relevance_slope, FLAGS.relevance_offset),
                        tokens=FLAGS.tokens, vocab_size=FLAGS.vocab_size,
                        vectors=FLAGS.word_vectors)
  except (FileNotFoundError, ValueError) as error:
    command.exit_with(error, 1)
  print(format_rules(rows))
  if FLAGS.output_json:
    files.write_json(FLAGS.output_json, rows)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=command.parse_flags)
