"""What a batch's loss may use beyond the batch itself: each clip's event kinds (the
built-in corpus records them) and the captions' similarity (`--config.similarity`).

  relations = CaptionRelations(builder, events, tokenizer, similarity="tfidf",
                               word_table=None, training_captions=captions)
  batch = relations.add(batch, "development")  # + events [B, K], caption_similarity [B, B]

For a cross-batch memory, which compares its captions with later batches', a training
batch also carries each caption's unit vector under the similarity (`vectors_split`).
"""

from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from ntxr import false_negatives
from ntxr.data import synthetic


class CaptionRelations:
  """A corpus's relations between a batch's pairs. builder: its TFDS builder; events:
  {split: {file_name: [event kind]}} of the built-in corpus, or None for recorded data;
  similarity: "", "tfidf" (over `training_captions` as the tokenizer reads them),
  "word_vectors" (`word_table`'s) or "events"; vectors_split: the split whose batches
  carry their captions' unit vectors [B, D] too (caption_vectors), under tfidf and
  word_vectors (`vector_width`); None: no split's."""

  def __init__(self, builder, events: Optional[dict], tokenizer, similarity: str,
               word_table: Optional[np.ndarray], training_captions: list,
               vectors_split: Optional[str] = None):
    if similarity == "events" and events is None:
      raise ValueError("--config.similarity=events needs the built-in corpus, whose clips' "
                       "events are known: use tfidf or word_vectors on recorded data")
    self.builder, self.events, self.similarity = builder, events, similarity
    self.word_table = word_table
    self.vectors_split = (vectors_split if similarity in ("tfidf", "word_vectors")
                          else None)
    self._events = {}  # split -> [clips, kinds] bool by audio_id
    self._idf = None
    if similarity == "tfidf":  # over the training captions, as the model sees them
      self._idf = false_negatives.inverse_document_frequency(
          [tokenizer.encode(caption) for caption in training_captions], tokenizer.vocab_size)

  @property
  def vector_width(self) -> Optional[int]:
    """D of a batch's caption_vectors, or None where it carries none."""
    if self.vectors_split is None:
      return None
    return len(self._idf) if self.similarity == "tfidf" else self.word_table.shape[1]

  @property
  def event_kinds(self) -> Optional[int]:
    """How many event kinds a batch's events name, or None for recorded data (no events)."""
    return None if self.events is None else len(synthetic.EVENT_KINDS)

  def clip_events(self, split: str) -> Optional[np.ndarray]:
    """[clips, len(synthetic.EVENT_KINDS)] bool each clip's event kinds by audio_id, or
    None for recorded data."""
    if self.events is None:
      return None
    if split not in self._events:
      clips = self.builder.as_dataset(split=split,
                                      decoders={"logmel": tfds.decode.SkipDecoding()})
      kinds = [kind.name for kind in synthetic.EVENT_KINDS]
      names = {int(c["audio_id"]): c["file_name"].decode() for c in tfds.as_numpy(clips)}
      table = np.zeros((len(names), len(kinds)), bool)
      for audio_id, name in names.items():
        table[audio_id, [kinds.index(k) for k in self.events[split][name]]] = True
      self._events[split] = table
    return self._events[split]

  def add(self, batch: dict, split: str) -> dict:
    """The batch of `split` with its relations: events [B, K] bool (the built-in corpus),
    caption_similarity [B, B] (with a similarity) and caption_vectors [B, D] float32 (of
    `vectors_split`)."""
    extra, events = {}, self.clip_events(split)
    if events is not None:
      extra["events"] = events[batch["audio_id"]]
    vectors = None
    if self.similarity == "tfidf":
      vectors = false_negatives.tfidf_vectors(batch["tokens"], batch["token_mask"], self._idf)
    elif self.similarity == "word_vectors":
      vectors = false_negatives.word_vector_sums(batch["tokens"], batch["token_mask"],
                                                 self.word_table)
    elif self.similarity == "events":
      extra["caption_similarity"] = false_negatives.event_similarity(extra["events"])
    if vectors is not None:
      extra["caption_similarity"] = false_negatives.cosine(vectors)
      if split == self.vectors_split:
        extra["caption_vectors"] = false_negatives.unit_rows(vectors).astype(np.float32)
    return dict(batch, **extra)
