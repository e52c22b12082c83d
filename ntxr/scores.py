"""Score matrices between padded sequence embeddings (JAX and NumPy only).

The alignment score of a sequence x [T, E] against a sequence y [W, E] is the mean
over valid (t, w) of relu(<x[t], y[w]>): the frame-word score of Xie, Rasanen and
Virtanen, "On Negative Sampling for Contrastive Audio-Text Retrieval", ICASSP 2023.
The same score serves across modalities (audio frames x caption words) and within
one (audio x audio, caption x caption). The pooled score is the dot product of the
L2-normalised masked means.

Padding never counts: masked frames are zeroed before the products (relu(0) = 0),
and each sum is divided by the number of valid (t, w) pairs, so a pair's score does
not depend on its batch mates. A sequence with no valid step scores 0.

Matrices are built tile by tile, so peak memory is bounded by `tile_elements`
whatever the sequence lengths (see `alignment_scores`). How the tiles are cut depends on
the backend (`TILINGS`): on a CPU one row at a time, which keeps each product in cache;
on an accelerator blocks of rows, so that each launch carries enough work.
"""

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Frame-pair products held at once in one tile: 2**24 floats is 64 MiB in float32.
DEFAULT_TILE_ELEMENTS = 1 << 24

# Beyond one tile, "rows": each x row meets blocks of y as one [rows * W, T] product
# (a CPU's cache holds it while it is summed); "blocks": blocks of x rows meet blocks of
# y, tiles as large as `tile_elements` allows (an accelerator pays per launch).
TILINGS = ("rows", "blocks")


def tiling_for(tiling: Optional[str]) -> str:
  """`tiling`, or where None the default backend's: "rows" on a CPU, else "blocks"."""
  if tiling is None:
    return "rows" if jax.default_backend() == "cpu" else "blocks"
  if tiling not in TILINGS:
    raise ValueError(f"unknown tiling {tiling!r}; choose from {TILINGS}")
  return tiling


def _check_sequences(name: str, x: Array, mask: Optional[Array]) -> None:
  """Raises ValueError unless x is float [N, T, E] and mask, if any, is bool [N, T]."""
  if x.ndim != 3:
    raise ValueError(f"{name} must be [N, T, E], got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point, got {x.dtype}")
  if mask is not None:
    if mask.shape != x.shape[:2]:
      raise ValueError(
          f"{name} mask must have shape {x.shape[:2]}, got {mask.shape}")
    if mask.dtype != jnp.bool_:
      raise ValueError(f"{name} mask must be boolean, got {mask.dtype}")


def _zero_padding(x: Array, mask: Optional[Array]) -> tuple[Array, Array]:
  """Zeroes masked steps. Returns (x [N, T, E], valid step counts [N])."""
  if mask is None:
    return x, jnp.full(x.shape[:1], x.shape[1], _accumulator(x))
  return (jnp.where(mask[..., None], x, jnp.zeros((), x.dtype)),
          mask.sum(axis=1).astype(_accumulator(x)))


def _divide_counts(sums: Array, counts: Array) -> Array:
  """sums / counts, 0 where counts is 0."""
  safe = jnp.where(counts > 0, counts, 1.0)
  return jnp.where(counts > 0, sums / safe, 0.0)


def _accumulator(*arrays: Array):
  """The dtype sums are kept in: the inputs' promoted dtype, at least float32."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _relu_sums(x: Array, y: Array) -> Array:
  """Sum of relu(<x[i, t], y[j, w]>) over (t, w): x [n, T, E], y [m, W, E] -> [n, m].

  The products are laid out [n, m, W, T], T minor, so the sum reads them in order."""
  products = jnp.einsum("mwe,nte->nmwt", y, x, preferred_element_type=_accumulator(x, y))
  return jax.nn.relu(products).sum(axis=(2, 3))


def _row_relu_sums(x_row: Array, y_block: Array) -> Array:
  """`_relu_sums` of one x row against a block: x_row [T, E], y_block [m, W, E] -> [m],
  through one [m * W, T] product."""
  m, w, e = y_block.shape
  products = jnp.matmul(y_block.reshape(m * w, e), x_row.T,
                        preferred_element_type=_accumulator(x_row, y_block))
  return jax.nn.relu(products).sum(axis=1).reshape(m, w).sum(axis=1)


# Recomputed in the backward pass, so gradients need no stored tile either.
_tile_relu_sums = jax.checkpoint(_relu_sums)
_tile_row_relu_sums = jax.checkpoint(_row_relu_sums)


def _pad_rows(x: Array, rows: int) -> Array:
  """Pads the leading axis of x with zeros up to `rows`."""
  return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _blocks(x: Array, block: int) -> Array:
  """[N, T, E] -> [ceil(N / block), block, T, E], zero-padded."""
  count = -(-x.shape[0] // block)
  return _pad_rows(x, count * block).reshape((count, block) + x.shape[1:])


def alignment_scores(x: Array, y: Array, x_mask: Optional[Array] = None,
                     y_mask: Optional[Array] = None, *,
                     tile_elements: int = DEFAULT_TILE_ELEMENTS,
                     tiling: Optional[str] = None) -> Array:
  """All-pairs alignment scores.

  Args:
    x: [N, T, E] float, e.g. audio frame embeddings.
    y: [M, W, E] float, e.g. caption word embeddings.
    x_mask: [N, T] bool, True at valid steps; None means all valid.
    y_mask: [M, W] bool, likewise.
    tile_elements: the most frame-pair products held at once.
    tiling: how tiles are cut beyond one (`TILINGS`); None: the backend's (`tiling_for`).

  Returns:
    S [N, M], S[i, j] = mean over valid (t, w) of relu(<x[i, t], y[j, w]>), in the
    dtype it is accumulated in: the inputs', at least float32 (bfloat16 embeddings
    give float32 scores, as selecting negatives and the losses need).

  Peak memory beyond inputs and output is one tile of `tile_elements` float32
  products (64 MiB in float32 by default; 2x that in the backward pass, which recomputes the
  tile), so audio-audio scores at N=256, T=1500 never hold N*T x N*T products.

  Example:
    >>> s = alignment_scores(jnp.ones((2, 3, 4)) / 2, jnp.ones((5, 6, 4)) / 2)
    >>> s.shape, float(s[0, 0])
    ((2, 5), 1.0)
  """
  _check_sequences("x", x, x_mask)
  _check_sequences("y", y, y_mask)
  if x.shape[2] != y.shape[2]:
    raise ValueError(f"embedding sizes differ: x {x.shape}, y {y.shape}")
  x, x_counts = _zero_padding(x, x_mask)
  y, y_counts = _zero_padding(y, y_mask)
  (n, t, _), (m, w, _) = x.shape, y.shape
  rows_y = min(m, max(1, tile_elements // (t * w)))  # whole y first, then x rows
  rows_x = min(n, max(1, tile_elements // (t * w * rows_y)))
  y_blocks = _blocks(y, rows_y)
  if rows_x == n and rows_y == m:
    sums = _relu_sums(x, y)
  elif tiling_for(tiling) == "rows":
    tiles = jax.lax.map(
        lambda row: jax.lax.map(lambda yb: _tile_row_relu_sums(row, yb), y_blocks), x)
    sums = tiles.reshape(n, y_blocks.shape[0] * rows_y)[:, :m]  # [n, blocks_y, rows_y]
  else:
    tiles = jax.lax.map(lambda xb: jax.lax.map(lambda yb: _tile_relu_sums(xb, yb), y_blocks),
                        _blocks(x, rows_x))  # [blocks_x, blocks_y, rows_x, rows_y]
    sums = tiles.transpose(0, 2, 1, 3).reshape(
        tiles.shape[0] * rows_x, y_blocks.shape[0] * rows_y)[:n, :m]
  return _divide_counts(sums, x_counts[:, None] * y_counts[None, :])


def alignment_sums_over_words(x: Array, x_mask: Optional[Array], words: Array,
                              owner: Array, *, captions: int,
                              tile_elements: int = DEFAULT_TILE_ELEMENTS,
                              tiling: Optional[str] = None) -> Array:
  """Alignment sums of sequences against captions given as a flat list of their words.

  The evaluation's form: captions of any lengths, no word padding. Each x[i] costs one
  [K, T] product, laid out so that the sum over T reads it in order: one x row at a time
  with tiling "rows", as many as `tile_elements` products hold with "blocks" (at least
  one; None: the backend's tiling, `tiling_for`).

  Args:
    x: [N, T, E] float; x_mask [N, T] bool or None.
    words: [K, E] the captions' valid words one caption after another; rows of zeros
      may pad it (they add nothing).
    owner: [K] int, the caption (0 to captions - 1) of each word.
    captions: how many captions (static).

  Returns:
    [N, captions]: the sum over x[i]'s valid steps and caption c's words of
    relu(<x[i, t], word>); divided by the pair's valid (t, w) count it is
    `alignment_scores`.
  """
  _check_sequences("x", x, x_mask)
  x, _ = _zero_padding(x, x_mask)
  n, t, _ = x.shape
  rows = 1
  if tiling_for(tiling) == "blocks":
    rows = min(n, max(1, tile_elements // (t * words.shape[0])))

  def block(steps: Array) -> Array:  # [rows, T, E] -> [rows, captions]
    products = jnp.einsum("ke,nte->knt", words, steps,
                          preferred_element_type=_accumulator(x, words))
    return jax.ops.segment_sum(jax.nn.relu(products).sum(axis=2), owner,
                               num_segments=captions).T
  return jax.lax.map(block, _blocks(x, rows)).reshape(-1, captions)[:n]


def symmetric_alignment_scores(x: Array, x_mask: Optional[Array] = None, *,
                               tile_elements: int = DEFAULT_TILE_ELEMENTS) -> Array:
  """Within-modality alignment scores, computing each unordered pair once.

  Equals `alignment_scores(x, x, x_mask, x_mask)` at about half the FLOPs: rows are
  cut into B square blocks and only the B(B+1)/2 blocks on and above the diagonal
  are computed, then mirrored.

  Args:
    x: [N, T, E] float.
    x_mask: [N, T] bool or None.
    tile_elements: the most frame-pair products held at once.

  Returns:
    [N, N] symmetric matrix, dtype and peak memory as `alignment_scores`.
  """
  _check_sequences("x", x, x_mask)
  x, counts = _zero_padding(x, x_mask)
  n, t, _ = x.shape
  block = min(n, max(1, math.isqrt(tile_elements) // t))
  blocks = _blocks(x, block)
  count = blocks.shape[0]
  if count == 1:
    sums = _relu_sums(x, x)
  else:
    rows, cols = np.triu_indices(count)
    upper = jax.lax.map(lambda ij: _tile_relu_sums(blocks[ij[0]], blocks[ij[1]]),
                        (jnp.asarray(rows), jnp.asarray(cols)))
    tiles = jnp.zeros((count, count, block, block), upper.dtype)
    tiles = tiles.at[rows, cols].set(upper).at[cols, rows].set(
        upper.transpose(0, 2, 1))
    sums = tiles.transpose(0, 2, 1, 3).reshape(count * block, count * block)[:n, :n]
  sums = jnp.triu(sums) + jnp.triu(sums, 1).T  # exactly symmetric, diagonal tiles too
  return _divide_counts(sums, counts[:, None] * counts[None, :])


def _candidates(y: Array, y_mask: Optional[Array]):
  """[N, W, E] or [N, K, W, E] -> ([N*K, W, E], mask or None, K or None if unbatched)."""
  if y.ndim == 3:
    return y, y_mask, None
  if y.ndim != 4:
    raise ValueError(f"candidates must be [N, W, E] or [N, K, W, E], got {y.shape}")
  flat = lambda a: a.reshape((-1,) + a.shape[2:])
  return flat(y), None if y_mask is None else flat(y_mask), y.shape[1]


def paired_alignment_scores(x: Array, y: Array, x_mask: Optional[Array] = None,
                            y_mask: Optional[Array] = None) -> Array:
  """Alignment score of each x[i] against its own candidate(s) y[i].

  Args:
    x: [N, T, E] float; x_mask [N, T] bool or None.
    y: [N, W, E] (one candidate each) or [N, K, W, E] (K each) float; y_mask
      [N, W] or [N, K, W] bool or None.

  Returns:
    [N] or [N, K]: s[i, k] = alignment_scores(x[i:i+1], y[i, k:k+1])[0, 0]. One
    [T, K*W] product per row; peak memory N*T*K*W floats.
  """
  _check_sequences("x", x, x_mask)
  y_flat, y_mask, k = _candidates(y, y_mask)
  _check_sequences("y", y_flat, y_mask)
  if y.shape[0] != x.shape[0] or y.shape[-1] != x.shape[2]:
    raise ValueError(f"paired shapes differ: x {x.shape}, y {y.shape}")
  x, x_counts = _zero_padding(x, x_mask)
  y_flat, y_counts = _zero_padding(y_flat, y_mask)
  n, w, e = x.shape[0], y_flat.shape[1], x.shape[2]
  y_rows = y_flat.reshape(n, -1, w, e)
  products = jnp.einsum("nte,nkwe->nktw", x, y_rows,
                        preferred_element_type=_accumulator(x, y_rows))
  sums = jax.nn.relu(products).sum(axis=(2, 3))
  paired = _divide_counts(sums, x_counts[:, None] * y_counts.reshape(n, -1))
  return paired[:, 0] if k is None else paired


def unit_vectors(x: Array) -> Array:
  """x [..., E] over its L2 norm; zero vectors stay zero, with a finite gradient."""
  squared = jnp.sum(jnp.square(x.astype(_accumulator(x))), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, 1e-24)).astype(x.dtype)


def pooled_embeddings(x: Array, x_mask: Optional[Array] = None) -> Array:
  """Masked mean over steps, L2-normalised: [N, T, E] -> [N, E] (zeros stay zero), at
  least float32: N vectors cost little to keep exact, and a bfloat16 cosine would round
  away the small differences that selection reads."""
  _check_sequences("x", x, x_mask)
  x, counts = _zero_padding(x, x_mask)
  mean = x.astype(_accumulator(x)).sum(axis=1) / jnp.maximum(counts, 1.0)[:, None]
  return unit_vectors(mean)


def pooled_scores(x: Array, y: Array, x_mask: Optional[Array] = None,
                  y_mask: Optional[Array] = None) -> Array:
  """All-pairs cosine of pooled embeddings: [N, T, E], [M, W, E] -> [N, M], at least
  float32."""
  return jnp.matmul(pooled_embeddings(x, x_mask), pooled_embeddings(y, y_mask).T,
                    preferred_element_type=_accumulator(x, y))


def paired_pooled_scores(x: Array, y: Array, x_mask: Optional[Array] = None,
                         y_mask: Optional[Array] = None) -> Array:
  """Cosine of pooled x[i] and its pooled candidate(s): y [N, W, E] -> [N], [N, K, W, E] -> [N, K]."""
  y_flat, y_mask, k = _candidates(y, y_mask)
  pooled_y = pooled_embeddings(y_flat, y_mask).reshape(x.shape[0], -1, x.shape[2])
  paired = jnp.einsum("ne,nke->nk", pooled_embeddings(x, x_mask), pooled_y,
                      preferred_element_type=_accumulator(x, y))
  return paired[:, 0] if k is None else paired


@dataclasses.dataclass(frozen=True)
class Scorer:
  """One score in its three forms; each takes masks as keyword-or-positional args.

  Attributes:
    matrix: (x [N,T,E], y [M,W,E], x_mask, y_mask) -> [N, M].
    symmetric: (x [N,T,E], x_mask) -> [N, N], the within-modality matrix.
    paired: (x [N,T,E], y [N,W,E] or [N,K,W,E], x_mask, y_mask) -> [N] or [N, K].
  """
  matrix: Callable[..., Array]
  symmetric: Callable[..., Array]
  paired: Callable[..., Array]


SCORERS = {
    "alignment": Scorer(alignment_scores, symmetric_alignment_scores,
                        paired_alignment_scores),
    "pooled": Scorer(pooled_scores, lambda x, mask=None: pooled_scores(x, x, mask, mask),
                     paired_pooled_scores),
}


def get_scorer(name: str) -> Scorer:
  """The scorer called `name` ("alignment" or "pooled"); ValueError otherwise."""
  if name not in SCORERS:
    raise ValueError(f"unknown score {name!r}; choose from {sorted(SCORERS)}")
  return SCORERS[name]
