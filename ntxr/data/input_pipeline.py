"""tf.data pipelines from prepared clips to NumPy batches.

Training batches hold one example per (clip, caption):
  audio [B, T, mel] float32, audio_mask [B, T] bool, tokens [B, W] int32,
  token_mask [B, W] bool, audio_id [B] int64 (equal exactly for captions of one clip).
T is padded up to one of `frame_buckets` and W is fixed, so a jitted step compiles
once per bucket, not per batch.
"""

from typing import Iterator, Sequence

import tensorflow as tf
import tensorflow_datasets as tfds

from ntxr.data import tokenizer as tokenizer_lib

# The functions tf.data traces here have no Python control flow on tensors: they run as
# written, without AutoGraph's conversion (which costs time at each process's first
# pipelines and writes a file to the temporary folder for each function).
_as_written = tf.autograph.experimental.do_not_convert


def _tokenize(tokenizer: tokenizer_lib.Tokenizer, max_tokens: int):
  """tf string -> tokens [max_tokens] int32 padded with PAD_ID (truncated if longer)."""
  def encode(text):
    return tokenizer_lib.padded_ids(tokenizer, text.decode("utf-8"), max_tokens)
  def op(text):
    tokens = tf.numpy_function(encode, [text], tf.int32, stateful=False)
    return tf.ensure_shape(tokens, [max_tokens])
  return op


def _cropped_audio(logmel, max_frames: int) -> dict:
  """{audio: logmel's first max_frames frames, audio_length: their count}."""
  audio = logmel[:max_frames]
  return dict(audio=audio, audio_length=tf.shape(audio)[0])


def _pad_to_bucket(batch: dict, buckets: Sequence[int]) -> dict:
  """Pads audio to the smallest bucket >= its length and adds both masks."""
  frames = tf.shape(batch["audio"])[1]
  boundaries = tf.constant(buckets, tf.int32)
  target = tf.gather(boundaries, tf.searchsorted(boundaries, [frames])[0])
  batch = dict(batch)
  batch["audio"] = tf.pad(batch["audio"], [[0, 0], [0, target - frames], [0, 0]])
  batch["audio_mask"] = tf.sequence_mask(batch.pop("audio_length"), target)
  if "tokens" in batch:
    batch["token_mask"] = batch["tokens"] != tokenizer_lib.PAD_ID
  return batch


def _captions(clip: dict, tokenize) -> tf.data.Dataset:
  """One clip -> its captions' tokens, each with the clip's audio_id."""
  captions = tf.data.Dataset.from_tensor_slices(clip["captions"])
  return captions.map(_as_written(
      lambda text: dict(tokens=tokenize(text), audio_id=clip["audio_id"])))


def _pairs(clip: dict, tokenize, max_frames: int) -> tf.data.Dataset:
  """One clip -> one example per caption: the caption's tokens with the clip's audio."""
  audio = _cropped_audio(clip["logmel"], max_frames)
  return _captions(clip, tokenize).map(_as_written(lambda caption: dict(audio, **caption)))


def train_batches(clips: tf.data.Dataset, tokenizer: tokenizer_lib.Tokenizer, *,
                  batch_size: int, seed: int, frame_buckets: Sequence[int], max_tokens: int,
                  shuffle_buffer: int = 20000, drop_remainder: bool = True) -> tf.data.Dataset:
  """Shuffled (clip, caption) batches, the last short one dropped unless drop_remainder
  is False.

  Args:
    clips: prepared clips (`builder.as_dataset(split=...)`).
    tokenizer: caption tokenizer.
    batch_size: examples per global batch: every process reads the same batches and
      keeps its own rows (ntxr.parallel).
    seed: shuffle seed; the same seed gives the same batches.
  """
  tokenize = _tokenize(tokenizer, max_tokens)
  max_frames = frame_buckets[-1]
  ds = clips.flat_map(_as_written(lambda clip: _pairs(clip, tokenize, max_frames)))
  ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.padded_batch(batch_size, drop_remainder=drop_remainder)
  return ds.map(_as_written(lambda b: _pad_to_bucket(b, frame_buckets))).prefetch(
      tf.data.AUTOTUNE)


def clip_batches(clips: tf.data.Dataset, *, batch_size: int,
                 frame_buckets: Sequence[int]) -> tf.data.Dataset:
  """Every clip once, in order: audio, audio_mask, audio_id (last batch may be short)."""
  ds = clips.map(_as_written(lambda c: dict(_cropped_audio(c["logmel"], frame_buckets[-1]),
                                            audio_id=c["audio_id"])))
  ds = ds.padded_batch(batch_size)
  return ds.map(_as_written(lambda b: _pad_to_bucket(b, frame_buckets))).prefetch(
      tf.data.AUTOTUNE)


def caption_batches(clips: tf.data.Dataset, tokenizer: tokenizer_lib.Tokenizer, *,
                    batch_size: int, max_tokens: int) -> tf.data.Dataset:
  """Every caption once, in clip order: tokens, token_mask, audio_id."""
  tokenize = _tokenize(tokenizer, max_tokens)
  ds = clips.flat_map(_as_written(lambda clip: _captions(clip, tokenize)))
  ds = ds.batch(batch_size).map(_as_written(
      lambda b: dict(b, token_mask=b["tokens"] != tokenizer_lib.PAD_ID)))
  return ds.prefetch(tf.data.AUTOTUNE)


def as_numpy(ds: tf.data.Dataset) -> Iterator[dict]:
  """Iterates a batched dataset as dicts of NumPy arrays."""
  return iter(tfds.as_numpy(ds))
