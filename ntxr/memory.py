"""A cross-batch memory: the last K training batches' embeddings of both modalities, kept
in the train state as extra candidates for every anchor's pool
(`--config.memory_batches=K`; JAX only).

  memory = empty(state.apply_fn, state.variables(), batches=4, batch_size=32, frames=1024,
                 words=30, feature_width=64, event_kinds=None, vector_width=None)
  state = steps.with_memory(state, memory)
  # each step's loss reads memory.entries(); then, without gradient, the step writes
  memory = push(memory, embedded, events, caption_vectors)

Slot k of the K holds the batch of k + 1 steps ago (its embeddings as the model made
them then, frames padded to the longest length bucket's), with its clips' ids, the step
count since it was written (`age`, 0 for a slot never written), on the built-in corpus
its clips' event kinds, and under a caption similarity from vectors its captions' unit
vectors (`relations.CaptionRelations`), which later batches' captions are compared with.
An entry is a negative for an anchor of another clip only: the anchor's own clip's
entries, and empty entries, are neither negatives nor positives. No gradient flows into
the memory. A slot's rows beyond a short last batch stay empty.
"""

from typing import Optional

import flax
import jax
import jax.numpy as jnp

from ntxr import objectives

Array = jax.Array


@flax.struct.dataclass
class Memory:
  """audio [K, G, T, E], text [K, G, W, E] embeddings and their masks [K, G, T] and
  [K, G, W] bool; audio_ids [K, G] int32; age [K, G] int32 (steps since written, 0 for
  empty); events [K, G, C] bool or None (the clips' event kinds: false negatives, and
  the events similarity); caption_vectors [K, G, D] float32 or None (the tfidf or
  word_vectors similarity's)."""
  audio: Array
  text: Array
  audio_mask: Array
  text_mask: Array
  audio_ids: Array
  age: Array
  events: Optional[Array] = None
  caption_vectors: Optional[Array] = None

  @property
  def size(self) -> int:
    """M = K G: the entries."""
    return self.audio_ids.size

  def entries(self) -> objectives.Embedded:
    """The M entries as one Embedded ([M, ...], the newest slot first), without gradient."""
    flat = lambda x: x.reshape((-1,) + x.shape[2:])
    return jax.lax.stop_gradient(objectives.Embedded(
        flat(self.audio), flat(self.text), flat(self.audio_mask), flat(self.text_mask),
        flat(self.audio_ids)))

  def filled(self) -> Array:
    """[M] bool: the entries written."""
    return self.age.reshape(-1) > 0

  def flat(self, field: str) -> Optional[Array]:
    """The field's entries [M, ...] (events, caption_vectors), or None."""
    value = getattr(self, field)
    return None if value is None else value.reshape((-1,) + value.shape[2:])


def empty(apply_fn, variables: dict, *, batches: int, batch_size: int, frames: int,
          words: int, feature_width: int, event_kinds: Optional[int],
          vector_width: Optional[int]) -> Memory:
  """A memory of `batches` empty slots of batch_size entries, shaped as the model's
  (apply_fn, variables) embeddings of clips of `frames` frames (the longest bucket) of
  `feature_width` values and captions of `words` tokens; event_kinds: C, vector_width:
  D, or None where the batches carry no events, no caption vectors."""
  example = dict(audio=jnp.zeros((1, frames, feature_width)),
                 audio_mask=jnp.ones((1, frames), bool), tokens=jnp.ones((1, words), jnp.int32),
                 token_mask=jnp.ones((1, words), bool))
  audio, text = jax.eval_shape(lambda v: apply_fn(v, example, train=False), variables)
  slots = (batches, batch_size)
  zeros = lambda shape, dtype: jnp.zeros(slots + tuple(shape), dtype)
  return Memory(audio=zeros(audio.shape[1:], audio.dtype), text=zeros(text.shape[1:], text.dtype),
                audio_mask=zeros(audio.shape[1:2], bool), text_mask=zeros(text.shape[1:2], bool),
                audio_ids=zeros((), jnp.int32), age=zeros((), jnp.int32),
                events=None if event_kinds is None else zeros((event_kinds,), bool),
                caption_vectors=(None if vector_width is None else
                                 zeros((vector_width,), jnp.float32)))


def _fitted(x: Array, shape: tuple) -> Array:
  """x zero-padded at the end of each axis to `shape`; ValueError where it is longer."""
  if any(have > want for have, want in zip(x.shape, shape)):
    raise ValueError(f"a batch's {x.shape} does not fit the memory's {shape}: its clips are "
                     f"longer than the longest length bucket the memory was made for")
  return jnp.pad(x, [(0, want - have) for have, want in zip(x.shape, shape)])


def push(memory: Memory, embedded: objectives.Embedded, events: Optional[Array],
         caption_vectors: Optional[Array]) -> Memory:
  """The memory with the batch (`embedded` [B, ...], B at most G; events [B, C] and
  caption_vectors [B, D], each read where the memory keeps it) written into its newest
  slot, the others one step older and the oldest dropped; no gradient."""
  embedded = jax.lax.stop_gradient(embedded)
  fields = dict(audio=embedded.audio, text=embedded.text, audio_mask=embedded.audio_mask,
                text_mask=embedded.text_mask, audio_ids=embedded.audio_ids.astype(jnp.int32),
                age=jnp.ones(embedded.audio_ids.shape, jnp.int32))
  for name, value in (("events", events), ("caption_vectors", caption_vectors)):
    if getattr(memory, name) is not None:
      fields[name] = value
  older = memory.replace(age=jnp.where(memory.age > 0, memory.age + 1, 0))
  return older.replace(**{
      name: jnp.concatenate([_fitted(new, getattr(older, name).shape[1:])[None],
                             getattr(older, name)[:-1]]).astype(getattr(older, name).dtype)
      for name, new in fields.items()})
