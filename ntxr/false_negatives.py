"""False negatives: captions of other clips that describe the same sounds.

A batch's captions are compared on the host (NumPy), from a source the user names
(`settings.SIMILARITIES`): TF-IDF over the training captions' tokens, the mean of the frozen
word vectors, or the built-in corpus's events. In the step (JAX) that similarity
filters each anchor's pool and gives the "soft" objective its relevance; and where the
corpus knows each clip's events, the step measures how much of the negatives' weight
lands on clips with exactly the anchor clip's set of event kinds (false negatives).
"""

import collections
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntxr import sampling

Array = jax.Array


def inverse_document_frequency(token_lists, vocab_size: int) -> np.ndarray:
  """idf [V] over captions given as token-id sequences: log((1 + n) / (1 + df)) + 1."""
  df = np.zeros(vocab_size)
  for tokens in token_lists:
    df[np.unique(np.asarray(tokens, np.int64))] += 1
  return np.log((1 + len(token_lists)) / (1 + df)) + 1


def _cosine(vectors: np.ndarray) -> np.ndarray:
  """[B, D] -> [B, B] cosine similarity (0 for a zero vector)."""
  norms = np.linalg.norm(vectors, axis=1, keepdims=True)
  unit = vectors / np.where(norms > 0, norms, 1)
  return (unit @ unit.T).astype(np.float32)


def tfidf_similarity(tokens: np.ndarray, token_mask: np.ndarray, idf: np.ndarray) -> np.ndarray:
  """Cosine of the captions' TF-IDF vectors: tokens [B, W] int, token_mask [B, W] -> [B, B]."""
  counts = np.zeros((tokens.shape[0], idf.shape[0]))
  rows = np.broadcast_to(np.arange(tokens.shape[0])[:, None], tokens.shape)
  np.add.at(counts, (rows[token_mask], tokens[token_mask]), 1)
  return _cosine(counts * idf)


def word_vector_similarity(tokens: np.ndarray, token_mask: np.ndarray,
                           table: np.ndarray) -> np.ndarray:
  """Cosine of the captions' mean word vectors: table [V, E] -> [B, B]."""
  summed = np.einsum("bw,bwe->be", token_mask.astype(np.float64), table[tokens])
  return _cosine(summed)


def event_similarity(events: np.ndarray) -> np.ndarray:
  """Jaccard similarity of the captions' clips' event kinds: events [B, K] bool -> [B, B]."""
  events = events.astype(np.float64)
  shared = events @ events.T
  union = events.sum(1)[:, None] + events.sum(1)[None, :] - shared
  return (shared / np.maximum(union, 1)).astype(np.float32)


def filter_pool(pool: Array, s_cross: Array, similarity: Optional[Array], *,
                max_similarity: float, max_share_of_positive: float) -> Array:
  """Anchor i's pool [N, N] bool without the candidates j whose caption is more similar
  to i's than max_similarity, or whose cross score with i (either direction) is above
  max_share_of_positive times i's positive score (NV-Retriever's TopK-PercPos). A
  bound of 0 is off."""
  s = jax.lax.stop_gradient(s_cross)
  drop = jnp.zeros_like(pool)
  if max_similarity > 0:
    if similarity is None:
      raise ValueError("filtering by caption similarity needs a similarity source")
    drop = drop | (similarity > max_similarity)
  if max_share_of_positive > 0:
    bound = max_share_of_positive * jnp.diagonal(s)[:, None]
    drop = drop | (s.T > bound) | (s > bound)
  return pool & ~drop


def relevance(similarity: Array, positives: Array, slope: float, offset: float) -> Array:
  """Soft relevance [N, N]: 1 on positives, sigmoid(slope * similarity - offset) elsewhere."""
  return jnp.where(positives, 1.0, jax.nn.sigmoid(slope * similarity - offset))


def same_events(events: Array) -> Array:
  """[N, K] bool event kinds -> [N, N] bool: the two clips have exactly the same kinds."""
  return jnp.all(events[:, None, :] == events[None, :, :], axis=-1)


def chance_share(kinds) -> float:
  """The false-negative share of a uniformly random negative: over a split's clips (each
  given as its event kinds), the share of (clip, other clip) pairs with the same kinds."""
  counts = collections.Counter(frozenset(k) for k in kinds)
  n = sum(counts.values())
  return sum(c * (c - 1) for c in counts.values()) / max(n * (n - 1), 1)


def measured_shares(weights: Array, pool: Array, kept: Array, false: Array) -> dict:
  """Scalars measured against ground truth.

  Args:
    weights: [2, N, N] each anchor's weight on its negatives (caption anchors over clips,
      audio anchors over captions), rows summing to 1 (0 for an anchor without any).
    pool: [N, N] bool every other clip; kept: [N, N] bool what the filter left of it.
    false: [N, N] bool, candidate j is a false negative for anchor i.

  Returns:
    false_negative_share: the mean (over anchors with negatives) weight on false
      negatives; filtered_share: the share of the pool the filter removed;
      filtered_false_share: the share of those removed that were false negatives.
  """
  has = weights.sum(axis=-1) > 0
  per_anchor = jnp.sum(weights * false[None], axis=-1)
  removed = pool & ~kept
  return dict(false_negative_share=sampling.masked_mean(per_anchor, has),
              filtered_share=sampling.masked_mean(removed.astype(jnp.float32), pool),
              filtered_false_share=sampling.masked_mean(false.astype(jnp.float32), removed))
