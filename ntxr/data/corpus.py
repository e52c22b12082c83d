"""One call from a data folder (or none: the built-in corpus) to prepared clips and a tokenizer.

A user's data folder is only read: the prepared TFRecords and the tokenizer live in the
cache, in one folder per source folder. A cache in a bucket (gs://...) is kept in a local
folder on each machine that uses it (ntxr.data.staging).
"""

import dataclasses
import os
import time
from typing import Optional

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from ntxr import files, layouts, relevance, settings
from ntxr.data import builders, captions, staging, synthetic, tokenizer, word_vectors

SPLITS_FILE = "splits.csv"  # in a pairs folder's prepared folder: the assigned splits
LOCKS = "locks"  # in the cache: one lock for each source, named as its prepared folder


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A prepared corpus: its builder (splits in `splits`: training, validation, test),
  caption tokenizer, what preparing left out, how long generating and preparing took
  in this call (0 when cached), for the built-in corpus each clip's event kinds
  ({split: {file name: [kinds]}}; None for recorded data), the DCASE 2025 relevance
  file found beside the captions (None if there is none), and the frozen word vectors of
  the tokenizer's words [vocab, dim] (None: the model learns its own)."""
  builder: builders.NtxrClotho
  tokenizer: object
  skipped: dict
  generate_s: float
  prepare_s: float
  events: Optional[dict] = None
  relevance_file: Optional[str] = None
  word_table: Optional[np.ndarray] = None
  _captions: dict = dataclasses.field(default_factory=dict, init=False, repr=False,
                                      compare=False)  # by split: `captions`

  @property
  def splits(self) -> tuple:
    return self.builder.SPLITS

  @property
  def feature_width(self) -> int:
    """A frame's values: mel bands, or waveform samples (`settings.Features.width`)."""
    return self.builder.builder_config.logmel.width

  def clips(self, split: str):
    """The split's clips, a tf.data.Dataset of {"logmel", "captions", "file_name", ...}."""
    return self.builder.as_dataset(split=split)

  def captions(self, split: str) -> list:
    """[(file_name, [captions])] of a split's clips in order, without decoding audio;
    read once a split (a prepared corpus does not change)."""
    if split not in self._captions:
      clips = self.builder.as_dataset(split=split,
                                      decoders={"logmel": tfds.decode.SkipDecoding()})
      self._captions[split] = [(c["file_name"].decode(), [x.decode() for x in c["captions"]])
                               for c in tfds.as_numpy(clips)]
    return self._captions[split]


def _tokenizer(kind: str, captions: list, folder: str, vocab_size: int, cleaning: str,
               vocabulary: str):
  """The caption tokenizer of `kind`, trained once and cached in `folder` (not
  "pretrained": `load_data` reads the text encoder's own)."""
  os.makedirs(folder, exist_ok=True)
  if kind == "words":
    return tokenizer.WordTokenizer(tokenizer.train_words(
        captions, os.path.join(folder, f"words_{cleaning}_{vocabulary}.txt"), cleaning))
  path = os.path.join(folder, f"spm_{vocab_size}_{cleaning}_{vocabulary}.model")
  return tokenizer.Tokenizer(tokenizer.train(captions, path, vocab_size, cleaning), cleaning)


def _prepared_dir(cache_dir: str, data_dir: str) -> str:
  """Where data_dir's prepared TFRecords live: one folder per source folder (the built-in
  corpus, generated inside the cache, by its name alone)."""
  source = os.path.abspath(data_dir)
  if os.path.dirname(source) == os.path.abspath(cache_dir):
    return os.path.join(cache_dir, "tfds", os.path.basename(source))
  return os.path.join(cache_dir, "tfds", f"{os.path.basename(source)}-{staging.digest(source)}")


def _record_splits(pairs, path: str) -> None:
  """Writes which split each file of a captions.csv went to, and says so once when the
  splits were assigned (no split column)."""
  if not pairs.assigned or files.exists(path):
    return
  files.write_text(path, builders.split_file(pairs))
  counts = ", ".join(f"{len(clips)} {split}" for split, clips in pairs.clips.items())
  logging.warning("captions.csv has no split column: its files were split %s (seed %d); "
                  "the split is recorded in %s", counts, captions.SPLIT_SEED, path)


def load(data_dir=None, *, cache_dir, size="default", logmel=settings.Features(),
         tokens="sentencepiece", vocab_size=1000, cleaning="ntxr", vocabulary="training",
         skip_bad_files=False, stage_dir=staging.STAGE_DIR) -> Corpus:
  """Prepares (once) and opens a Clotho v2, AudioCaps or pairs folder, or the built-in corpus.

  Args:
    data_dir: a Clotho v2 or AudioCaps folder, or one holding captions.csv (told apart by
      their caption files), or None for the built-in synthetic corpus of `size`.
    cache_dir: a local folder, or a bucket folder kept in a local copy under stage_dir.
    logmel: feature parameters; sample_rate 0 takes the corpus's own (16 kHz synthetic,
      44.1 kHz otherwise).
    tokens: "sentencepiece" (vocab_size pieces) or "words" (every word seen).
    cleaning: caption cleaning, a name in `captions.TEXT_CLEANING`.
    vocabulary: "training" (the training split's captions) or "all" (every split's, as
      the authors' frozen word2vec vocabulary).
  """
  if vocabulary not in settings.VOCABULARIES:
    raise ValueError(f"vocabulary must be one of {settings.VOCABULARIES}, not {vocabulary!r}")
  bucket = files.is_bucket(cache_dir)
  local = staging.local_copy(cache_dir, stage_dir) if bucket else cache_dir
  generated = data_dir is None
  if generated:
    data_dir = os.path.join(local, f"synthetic_{size}")
    logmel = dataclasses.replace(
        logmel, sample_rate=logmel.sample_rate or layouts.SYNTHETIC_SAMPLE_RATE)
  logmel = dataclasses.replace(logmel,
                               sample_rate=logmel.sample_rate or layouts.FOLDER_SAMPLE_RATE)
  prepared = _prepared_dir(local, data_dir)
  # Processes sharing a cache (a sweep's parallel runs) generate and prepare a source one
  # at a time, the others then reuse it; a run of another source does not wait for them.
  with files.locked(os.path.join(local, LOCKS, os.path.basename(prepared)), wait=True):
    generate_s = 0.0
    if generated:
      start = time.perf_counter()
      synthetic.generate(data_dir, size)
      generate_s = time.perf_counter() - start
    builder_class = builders.builder_for(data_dir)
    bucket_copy = f"{cache_dir.rstrip('/')}/{os.path.relpath(prepared, local)}"
    if bucket:
      staging.download(bucket_copy, prepared)
    builder = builder_class(data_dir=prepared, config=builders.clotho_config(logmel),
                            skip_bad_files=skip_bad_files)
    start = time.perf_counter()
    builders.prepare(builder, data_dir)
    prepare_s = time.perf_counter() - start
    if builder_class is builders.NtxrPairs:
      _record_splits(builder.pairs(data_dir), os.path.join(prepared, SPLITS_FILE))
    splits = builder.SPLITS if vocabulary == "all" else builder.SPLITS[:1]
    captions = [c for split in splits for c in builder.caption_texts(data_dir, split)]
    tok = _tokenizer(tokens, captions, os.path.join(prepared, "tokenizers"), vocab_size,
                     cleaning, vocabulary)
    if bucket:
      staging.upload(prepared, bucket_copy)
  skipped = builders.skipped(builder)
  for split, entries in skipped.items():
    if entries:
      logging.warning("%s: %d clips or rows were left out when the data was prepared "
                      "(skip_bad_files): %s", split, len(entries), "; ".join(entries))
  relevance_file = os.path.join(data_dir, relevance.DCASE2025_FILE)
  return Corpus(builder, tok, skipped, generate_s, prepare_s, synthetic.read_events(data_dir),
                relevance_file if files.exists(relevance_file) else None)


def load_data(data: settings.Data) -> Corpus:
  """`load` with a run's data settings, and the word vectors or the pretrained text
  encoder's tokenizer they name."""
  pretrained = data.tokens == "pretrained"
  corpus = load(data.data_dir, cache_dir=data.cache_dir,
                stage_dir=data.stage_dir or staging.STAGE_DIR, size=data.size,
                logmel=data.features, tokens="words" if pretrained else data.tokens,
                vocab_size=data.vocab_size, cleaning=data.text_cleaning,
                vocabulary=data.vocabulary, skip_bad_files=data.skip_bad_files)
  if pretrained:
    return dataclasses.replace(corpus, tokenizer=tokenizer.PretrainedTokenizer(
        data.text_weights, data.max_tokens))
  if not data.word_vectors:
    return corpus
  words = corpus.tokenizer.words
  table, missing = word_vectors.read_word2vec(data.word_vectors, words,
                                              missing=data.missing_word_vectors,
                                              variants=data.word_variants)
  if missing:
    logging.warning("word vectors: %d of %d words are not in %s and get %s vectors "
                    "(frozen), the first: %s", len(missing), len(words), data.word_vectors,
                    "one shared UNK" if data.missing_word_vectors == "one_unk" else "random",
                    ", ".join(missing[:10]))
  return dataclasses.replace(corpus, word_table=table)
