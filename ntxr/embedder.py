"""Embeds clips and captions with a trained state, in batches shaped as training shapes
them: what validation, testing and search share."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ntxr import evaluate, parallel, steps
from ntxr.data import input_pipeline
from ntxr.data import tokenizer as tokenizer_lib


@functools.partial(jax.jit, static_argnames="method")
def _embed(state: steps.TrainState, arrays: tuple, method: str) -> jax.Array:
  return state.apply_fn(state.variables(), *arrays, method=method)


@functools.partial(jax.jit, static_argnames="method")
def _embed_runs(states: steps.TrainState, arrays: tuple, method: str) -> jax.Array:
  """[B, L, R * E]: the embeddings [B, L, E] of each of the R stacked states, side by side
  on the feature axis (so that rows are cut and padded as one state's are)."""
  embedded = jax.vmap(lambda state: _embed(state, arrays, method))(states)  # [R, B, L, E]
  return jnp.moveaxis(embedded, 0, -2).reshape(*embedded.shape[1:-1], -1)


class Embedder:
  """A state's encoders over `devices`, fed batches of `batch_size`: clips cut to the
  longest of `frame_buckets` and padded to a bucket, captions tokenized by `tokenizer` to
  `max_tokens`."""

  def __init__(self, state: steps.TrainState, devices: parallel.Devices, *, tokenizer,
               frame_buckets: tuple, max_tokens: int, batch_size: int):
    self.state, self.devices, self.tokenizer = state, devices, tokenizer
    self.frame_buckets, self.max_tokens, self.batch_size = frame_buckets, max_tokens, batch_size

  def _embed(self, method: str):
    return lambda arrays: _embed(self.state, arrays, method)

  def split(self, clips) -> evaluate.SplitEmbeddings:
    """Every clip and caption of a split's clips (a tf.data.Dataset) embedded, in order."""
    size = self.batch_size
    audio = evaluate.embed_rows(
        self._embed("embed_audio"), input_pipeline.as_numpy(input_pipeline.clip_batches(
            clips, batch_size=size, frame_buckets=self.frame_buckets)),
        ("audio", "audio_mask"), size, self.devices)
    text = evaluate.embed_rows(
        self._embed("embed_text"), input_pipeline.as_numpy(input_pipeline.caption_batches(
            clips, self.tokenizer, batch_size=size, max_tokens=self.max_tokens)),
        ("tokens", "token_mask"), size, self.devices)
    return evaluate.SplitEmbeddings(*audio, *text)

  def features(self, clips: list) -> list:
    """Frame embeddings [T_i, E] float32 of log-mel clips [T_i, F], each cut to the longest
    frame bucket as training cuts it; embedded in batches of clips of similar length."""
    size = self.batch_size
    clips = [clip[:self.frame_buckets[-1]] for clip in clips]
    order = np.argsort([len(clip) for clip in clips], kind="stable")
    embedded = [None] * len(clips)
    for start in range(0, len(order), size):
      rows = order[start:start + size]
      frames = min(bucket for bucket in self.frame_buckets
                   if bucket >= max(len(clips[i]) for i in rows))
      batch = dict(audio=np.stack([np.pad(clips[i], [(0, frames - len(clips[i])), (0, 0)])
                                   for i in rows]),
                   audio_mask=np.arange(frames) < np.array([[len(clips[i])] for i in rows]),
                   audio_id=np.asarray(rows))
      audio, _, _ = evaluate.embed_rows(self._embed("embed_audio"), [batch],
                                        ("audio", "audio_mask"), size, self.devices)
      for row, i in enumerate(rows):
        embedded[i] = audio[row, :len(clips[i])]
    return embedded

  def captions(self, captions: list) -> tuple:
    """(word embeddings [Q, max_tokens, E], mask [Q, max_tokens]) of captions, tokenized
    as training tokenizes them."""
    size, length = self.batch_size, self.max_tokens
    tokens = np.stack([tokenizer_lib.padded_ids(self.tokenizer, c, length) for c in captions])
    batches = [dict(tokens=rows, token_mask=rows != tokenizer_lib.PAD_ID,
                    audio_id=np.arange(i, i + len(rows)))
               for i, rows in ((i, tokens[i:i + size]) for i in range(0, len(tokens), size))]
    text, mask, _ = evaluate.embed_rows(self._embed("embed_text"), batches,
                                        ("tokens", "token_mask"), size, self.devices)
    return text, mask


class RunsEmbedder(Embedder):
  """The encoders of R runs whose train states are stacked (`ntxr.together`): each batch
  is read once and embedded by every run, the runs' embeddings side by side on the
  feature axis ([..., R * E]); `splits` parts a split's."""

  def _embed(self, method: str):
    return lambda arrays: _embed_runs(self.state, arrays, method)

  def splits(self, clips) -> list:
    """The R runs' SplitEmbeddings of a split's clips, in the runs' order."""
    joined = self.split(clips)
    runs = len(jax.tree.leaves(self.state)[0])
    per_run = lambda x: np.split(x, runs, axis=-1)
    return [dataclasses.replace(joined, audio=audio, text=text)
            for audio, text in zip(per_run(joined.audio), per_run(joined.text))]
