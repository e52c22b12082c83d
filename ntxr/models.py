"""The paper's encoders in Flax Linen: a CRNN over log-mel frames, word embeddings; or
pretrained encoders (`ntxr.encoders`) with a linear projection each (PretrainedAudio,
PretrainedText).

All return L2-normalised embeddings, one per frame / per token, zero where masked, in
the compute dtype `dtype` (float32, or bfloat16 on accelerators); parameters are float32.
A clip's embedding does not depend on how much padding its batch added: padded frames
are zeroed after every layer, dropout draws each frame's mask from its index, the GRU
stops at each clip's length and upsampling clamps at it. Of the pretrained encoders,
CNN14 zeroes padding after every layer too (in training its dropout masks follow the
padded shape), while PaSST attends to padding as its reference does, so its runs pad
every clip to one length (`settings`).
"""

import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ntxr import scores
from ntxr.encoders import bert

Array = jax.Array
PAPER_CHANNELS = (32, 128, 128, 128, 128)
PAPER_POOLS = ((2, 4), None, (2, 4), None, (1, 4))  # (time, frequency) after each block
COMPUTE_DTYPES = ("float32", "bfloat16")
INITIALIZERS = ("flax", "pytorch")  # see _initializers
POOL_REMAINDERS = ("keep", "drop")  # see CRNN


def l2_normalize(x: Array, mask: Array) -> Array:
  """x [..., E] / its norm, zero where mask [...] is False (and for zero vectors)."""
  return jnp.where(mask[..., None], scores.unit_vectors(x), jnp.zeros((), x.dtype))


def lp_pool(x: Array, window: Tuple[int, int], p: float = 4.0) -> Array:
  """(sum over each window of x^p)^(1/p) on [B, T, F, C], stride = window (PyTorch LPPool2d).

  T and F must be multiples of the window (a reshape, which XLA runs faster than a
  strided reduce_window on CPU).
  """
  b, t, f, c = x.shape
  wt, wf = window
  total = (x ** p).reshape(b, t // wt, wt, f // wf, wf, c).sum(axis=(2, 4))
  return jnp.maximum(total, 1e-12) ** (1 / p)  # bounded gradient at all-zero windows


def upsample_linear(x: Array, lengths: Array, factor: int,
                    out_lengths: Optional[Array] = None) -> Array:
  """Linear interpolation by `factor` along time, clamped at each row's own length.

  Args:
    x: [B, T, D]; lengths: [B] valid steps of each row (>= 1); factor: int.
    out_lengths: [B] frames each row is stretched to (PyTorch's `size=`: a source step
      of lengths / out_lengths), or None for a step of 1 / factor.
  Returns:
    [B, T * factor, D], PyTorch's `interpolate(mode="linear", align_corners=False)`
    applied to each row's first `lengths` steps.
  """
  steps = jnp.arange(x.shape[1] * factor)
  scale = (1 / factor if out_lengths is None
           else (lengths / jnp.maximum(out_lengths, 1))[:, None])
  position = jnp.clip((steps + 0.5) * scale - 0.5, 0, (lengths - 1)[:, None])
  low = jnp.floor(position).astype(jnp.int32)
  high = jnp.minimum(low + 1, (lengths - 1)[:, None])
  weight = (position - low)[..., None].astype(x.dtype)
  take = lambda i: jnp.take_along_axis(x, i[..., None], axis=1)
  return (1 - weight) * take(low) + weight * take(high)


def frame_dropout(x: Array, rate: float, key: Array) -> Array:
  """Dropout on x [B, T, D] whose mask for frame t is drawn from fold_in(key, t), so a
  clip's draws do not depend on how many padded frames its batch has (runs trained
  together pad their batches to the longest)."""
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(x.shape[1]))
  keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1 - rate, (x.shape[0], x.shape[2])),
                  out_axes=1)(keys)
  return jnp.where(keep, x / (1 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def compute_dtype(name) -> jnp.dtype:
  """The encoders' compute dtype named `name` (one of COMPUTE_DTYPES)."""
  try:
    dtype = jnp.dtype(name)
  except TypeError:
    dtype = None
  if dtype is None or dtype.name not in COMPUTE_DTYPES:
    raise ValueError(f"compute dtype must be one of {COMPUTE_DTYPES}, not {name!r}")
  return dtype


def _pytorch_uniform(fan: int):
  """PyTorch's RNN initialiser: uniform in [-1/sqrt(fan), 1/sqrt(fan)]."""
  bound = 1 / math.sqrt(fan)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype,
                                                                   -bound, bound)


def _initializers(name: str, hidden: int) -> tuple:
  """(conv kernel init, GRUCell init kwargs) of `name`: "flax" (Flax's defaults) or
  "pytorch" (the authors': kaiming_normal_ convolutions, PyTorch's GRU uniform; Flax's
  GRU has one bias per reset/update gate where PyTorch sums two, each drawn once here)."""
  if name == "flax":
    return nn.linear.default_kernel_init, {}
  if name != "pytorch":
    raise ValueError(f"initializer must be one of {INITIALIZERS}, not {name!r}")
  uniform = _pytorch_uniform(hidden)
  return (nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
          dict(kernel_init=uniform, recurrent_kernel_init=uniform, bias_init=uniform))


def _downsampled_mask(mask: Array, factor: int, remainder: str) -> Array:
  """[B, T] -> [B, T // factor]: a step is valid when any frame it covers is (remainder
  "keep") or when all are ("drop": PyTorch's pooling floor)."""
  covered = mask.reshape(mask.shape[0], -1, factor)
  return covered.any(axis=-1) if remainder == "keep" else covered.all(axis=-1)


class CRNN(nn.Module):
  """Log-mel [B, T, F] -> frame embeddings [B, T, embed_dim].

  Per block BatchNorm, a 3x3 conv and LeakyReLU(0.1), then LP-pooling (p=4) over
  (time, frequency) where the block names a window, as in the authors' encoder;
  dropout; a bidirectional GRU (embed_dim // 2 per direction); linear upsampling
  back to T frames. BatchNorm statistics skip padded frames (and are reduced in float32).
  pool_remainder: a clip's last window that its frames only partly fill is pooled
  ("keep") or dropped as PyTorch's LPPool2d floors it ("drop", the authors').
  """
  channels: Sequence[int] = PAPER_CHANNELS
  pools: Sequence[Optional[Tuple[int, int]]] = PAPER_POOLS
  embed_dim: int = 300
  dropout: float = 0.3
  initializer: str = "flax"
  pool_remainder: str = "keep"
  dtype: Any = jnp.float32
  conv_precision: Optional[str] = None  # None: jax.default_matmul_precision's

  @nn.compact
  def __call__(self, audio: Array, mask: Array, *, train: bool) -> Array:
    frames = audio.shape[1]
    if len(self.channels) != len(self.pools):
      raise ValueError(f"{len(self.channels)} channel counts but {len(self.pools)} pools")
    stride = math.prod(window[0] for window in self.pools if window)
    pad = -frames % stride
    x = jnp.pad(audio.astype(self.dtype), ((0, 0), (0, pad), (0, 0)))[..., None]  # [B,T,F,1]
    step_mask = jnp.pad(mask, ((0, 0), (0, pad)))
    conv_init, gru_init = _initializers(self.initializer, self.embed_dim // 2)
    for channels, window in zip(self.channels, self.pools):
      valid = jnp.broadcast_to(step_mask[:, :, None, None], x.shape)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(
          x, mask=valid)
      x = nn.Conv(channels, (3, 3), padding="SAME", use_bias=False, kernel_init=conv_init,
                  precision=self.conv_precision,
                  dtype=self.dtype)(x * valid.astype(self.dtype))
      x = nn.leaky_relu(x, 0.1)
      if window:
        x = lp_pool(x, window)
        step_mask = _downsampled_mask(step_mask, window[0], self.pool_remainder)
    x = x * step_mask[:, :, None, None].astype(x.dtype)
    x = x.reshape(*x.shape[:2], -1)
    if train and self.dropout:
      x = frame_dropout(x, self.dropout, self.make_rng("dropout"))
    lengths = jnp.maximum(step_mask.sum(axis=1), 1)
    gru = lambda: nn.RNN(nn.GRUCell(self.embed_dim // 2, dtype=self.dtype, **gru_init))
    x = nn.Bidirectional(gru(), gru())(x, seq_lengths=lengths)  # the carry stays float32
    out_lengths = None if self.pool_remainder == "keep" else mask.sum(axis=1)
    x = upsample_linear(x.astype(self.dtype), lengths, stride, out_lengths)[:, :frames]
    return l2_normalize(x, mask)


class TextEncoder(nn.Module):
  """Token ids [B, W] -> word embeddings [B, W, embed_dim] (a plain lookup table).

  The table can be overwritten with word2vec vectors after `init` (and frozen by the
  optimizer): see `steps.create_train_state`.
  """
  vocab_size: int
  embed_dim: int = 300
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array, mask: Array) -> Array:
    embed = nn.Embed(self.vocab_size, self.embed_dim, name="embed", dtype=self.dtype,
                     embedding_init=nn.initializers.normal(1.0))
    return l2_normalize(embed(tokens), mask)


class PretrainedAudio(nn.Module):
  """Waveform frames [B, T, hop] -> frame embeddings [B, T, embed_dim]: a pretrained audio
  encoder (`encoders.cnn14.Cnn14` or `encoders.passt.Encoder`) on each
  clip's waveform, its frame outputs [B, T', D] projected to embed_dim and stretched
  linearly back over the clip's T frames, as the CRNN upsamples its own; with
  clip_output, its clip output (CNN14's `embedding`, PaSST's tokens) projected at every
  frame, whose masked mean (the pooled score's) it then is. frozen: the encoder runs in
  inference mode and passes no gradient back (its projection trains)."""
  encoder: nn.Module
  embed_dim: int = 300
  dtype: Any = jnp.float32
  frozen: bool = False
  clip_output: bool = False

  @nn.compact
  def __call__(self, audio: Array, mask: Array, *, train: bool) -> Array:
    batch, frames, hop = audio.shape
    lengths = mask.sum(axis=1)
    outputs = self.encoder(audio.reshape(batch, frames * hop), lengths * hop,
                           train=train and not self.frozen)
    project = lambda x: nn.Dense(self.embed_dim, dtype=self.dtype, name="projection")(
        jax.lax.stop_gradient(x) if self.frozen else x)
    if self.clip_output:  # clip [B, D]
      x = project(outputs[2])[:, None]
      return l2_normalize(jnp.broadcast_to(x, (batch, frames, x.shape[-1])), mask)
    x, x_mask = project(outputs[0]), outputs[1]  # frames [B, T', D] and their mask
    factor = -(-frames // x.shape[1])
    x = upsample_linear(x, jnp.maximum(x_mask.sum(axis=1), 1), factor,
                        jnp.maximum(lengths, 1))[:, :frames]
    return l2_normalize(x, mask)


class PretrainedText(nn.Module):
  """Token ids [B, W] (`data.tokenizer.PretrainedTokenizer`'s: the checkpoint's + 1, 0
  pads) -> word embeddings [B, W, embed_dim]: a BERT-family encoder, its last hidden
  states projected to embed_dim; with sentence_output, its sentence output at every
  word: the first token's state ([CLS], <s>; sentence_pooling "cls") or the words' mean
  ("mean", as Sentence-BERT's). frozen: as PretrainedAudio's."""
  encoder: nn.Module
  embed_dim: int = 300
  dtype: Any = jnp.float32
  frozen: bool = False
  sentence_output: bool = False
  sentence_pooling: str = "cls"

  @nn.compact
  def __call__(self, tokens: Array, mask: Array, *, train: bool = False) -> Array:
    ids = jnp.where(mask, tokens - 1, self.encoder.pad_token_id)
    words, _ = self.encoder(ids, mask, train=train and not self.frozen)
    if self.sentence_output:
      sentences = bert.pool_sentences(words, mask, self.sentence_pooling)
      words = jnp.broadcast_to(sentences[:, None], words.shape)
    if self.frozen:
      words = jax.lax.stop_gradient(words)
    return l2_normalize(nn.Dense(self.embed_dim, dtype=self.dtype, name="projection")(words),
                        mask)


class DualEncoder(nn.Module):
  """Both encoders; `__call__` embeds a batch, `embed_audio` / `embed_text` one side.
  dtype: the compute dtype (a name or a NumPy dtype). audio_encoder, text_encoder: a
  pretrained module (`ntxr.encoders`) in place of the CRNN or the word table (its
  variables under its field's name), or None; frozen: the sides ("audio", "text") whose
  pretrained encoder runs as published (see PretrainedAudio); pooled_outputs: pretrained
  encoders give their clip and sentence outputs at every frame and word (for the pooled
  score), not their frame and word outputs (for the alignment score)."""
  vocab_size: int
  embed_dim: int = 300
  channels: Sequence[int] = PAPER_CHANNELS
  dropout: float = 0.3
  initializer: str = "flax"
  pool_remainder: str = "keep"
  dtype: Any = jnp.float32
  conv_precision: Optional[str] = None  # the CRNN's (`CRNN`)
  audio_encoder: Optional[nn.Module] = None
  text_encoder: Optional[nn.Module] = None
  frozen: Tuple[str, ...] = ()
  pooled_outputs: bool = False
  sentence_pooling: str = "cls"  # see PretrainedText

  def setup(self):
    dtype = compute_dtype(self.dtype)
    if self.pool_remainder not in POOL_REMAINDERS:
      raise ValueError(f"pool_remainder must be one of {POOL_REMAINDERS}, "
                       f"not {self.pool_remainder!r}")
    if self.audio_encoder is None:
      self.audio = CRNN(self.channels, embed_dim=self.embed_dim, dropout=self.dropout,
                        initializer=self.initializer, pool_remainder=self.pool_remainder,
                        dtype=dtype, conv_precision=self.conv_precision)
    else:
      self.audio = PretrainedAudio(self.audio_encoder, self.embed_dim, dtype=dtype,
                                   frozen="audio" in self.frozen,
                                   clip_output=self.pooled_outputs)
    if self.text_encoder is None:
      self.text = TextEncoder(self.vocab_size, self.embed_dim, dtype=dtype)
    else:
      self.text = PretrainedText(self.text_encoder, self.embed_dim, dtype=dtype,
                                 frozen="text" in self.frozen,
                                 sentence_output=self.pooled_outputs,
                                 sentence_pooling=self.sentence_pooling)

  def embed_audio(self, audio: Array, audio_mask: Array, *, train: bool = False) -> Array:
    return self.audio(audio, audio_mask, train=train)

  def embed_text(self, tokens: Array, token_mask: Array, *, train: bool = False) -> Array:
    if self.text_encoder is None:  # a lookup: the same in training
      return self.text(tokens, token_mask)
    return self.text(tokens, token_mask, train=train)

  def __call__(self, batch: dict, *, train: bool = False) -> Tuple[Array, Array]:
    """batch {audio [B,T,F], audio_mask, tokens [B,W], token_mask} -> ([B,T,E], [B,W,E])."""
    return (self.embed_audio(batch["audio"], batch["audio_mask"], train=train),
            self.embed_text(batch["tokens"], batch["token_mask"], train=train))
