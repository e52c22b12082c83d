"""One call from a data folder (or none: the built-in corpus) to prepared clips and a tokenizer.

A user's data folder is only read: the prepared TFRecords and the tokenizer live in the
cache, in one folder per source folder.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import time
from typing import Optional

from absl import logging

from ntxr import files
from ntxr.data import builders, features, synthetic, tokenizer

TOKENS = ("sentencepiece", "words")
VOCABULARY_SPLITS = ("training", "all")  # which splits' captions a tokenizer learns from


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A prepared corpus: its builder (splits in `splits`: training, validation, test),
  caption tokenizer, what preparing left out, how long generating and preparing took
  in this call (0 when cached), and for the built-in corpus each clip's event kinds
  ({split: {file name: [kinds]}}; None for recorded data)."""
  builder: builders.NtxrClotho
  tokenizer: object
  skipped: dict
  generate_s: float
  prepare_s: float
  events: Optional[dict] = None

  @property
  def splits(self) -> tuple:
    return self.builder.SPLITS


def _tokenizer(kind: str, captions: list, folder: str, vocab_size: int, cleaning: str,
               vocabulary: str):
  """The caption tokenizer of `kind`, trained once and cached in `folder`."""
  os.makedirs(folder, exist_ok=True)
  if kind == "words":
    return tokenizer.WordTokenizer(tokenizer.train_words(
        captions, os.path.join(folder, f"words_{cleaning}_{vocabulary}.txt"), cleaning))
  path = os.path.join(folder, f"spm_{vocab_size}_{cleaning}_{vocabulary}.model")
  return tokenizer.Tokenizer(tokenizer.train(captions, path, vocab_size, cleaning), cleaning)


def _prepared_dir(cache_dir: str, data_dir: str) -> str:
  """Where data_dir's prepared TFRecords live: one folder per source folder."""
  source = os.path.abspath(data_dir)
  digest = hashlib.sha1(source.encode()).hexdigest()[:8]
  return os.path.join(cache_dir, "tfds", f"{os.path.basename(source)}-{digest}")


@contextlib.contextmanager
def _exclusive(path: str):
  """Holds an exclusive lock on the file `path`: processes sharing a cache (a sweep's
  parallel runs) generate and prepare it one at a time, the others then reuse it."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def load(data_dir=None, *, cache_dir, size="default", logmel=features.LogMelConfig(),
         tokens="sentencepiece", vocab_size=1000, cleaning="ntxr", vocabulary="training",
         skip_bad_files=False) -> Corpus:
  """Prepares (once) and opens a Clotho v2 or AudioCaps folder, or the synthetic corpus.

  Args:
    data_dir: a Clotho v2 or AudioCaps folder (told apart by their caption files), or
      None for the built-in synthetic corpus of `size`.
    logmel: feature parameters; sample_rate 0 takes the corpus's own (16 kHz synthetic,
      44.1 kHz otherwise).
    tokens: "sentencepiece" (vocab_size pieces) or "words" (every word seen).
    cleaning: caption cleaning, a name in `clotho.TEXT_CLEANING`.
    vocabulary: "training" (the training split's captions) or "all" (every split's, as
      the authors' frozen word2vec vocabulary).
  """
  if vocabulary not in VOCABULARY_SPLITS:
    raise ValueError(f"vocabulary must be one of {VOCABULARY_SPLITS}, not {vocabulary!r}")
  if files.is_bucket(cache_dir):
    raise ValueError(f"--config.cache_dir must be a local folder, not {cache_dir}: each "
                     "worker prepares the data into its own cache (a bucket workdir is fine)")
  with _exclusive(os.path.join(cache_dir, "lock")):
    generate_s = 0.0
    if data_dir is None:
      start = time.perf_counter()
      data_dir = synthetic.generate(os.path.join(cache_dir, f"synthetic_{size}"), size)
      generate_s = time.perf_counter() - start
      logmel = dataclasses.replace(logmel, sample_rate=logmel.sample_rate or synthetic.SAMPLE_RATE)
    logmel = dataclasses.replace(logmel, sample_rate=logmel.sample_rate or 44100)
    builder_class = builders.builder_for(data_dir)
    prepared = _prepared_dir(cache_dir, data_dir)
    builder = builder_class(data_dir=prepared, config=builders.clotho_config(logmel),
                            skip_bad_files=skip_bad_files)
    start = time.perf_counter()
    builders.prepare(builder, data_dir)
    prepare_s = time.perf_counter() - start
    splits = builder.SPLITS if vocabulary == "all" else builder.SPLITS[:1]
    captions = [c for split in splits for c in builder.captions(data_dir, split)]
    tok = _tokenizer(tokens, captions, os.path.join(prepared, "tokenizers"), vocab_size,
                     cleaning, vocabulary)
  skipped = builders.skipped(builder)
  for split, entries in skipped.items():
    if entries:
      logging.warning("%s: %d clips or rows were left out when the data was prepared "
                      "(skip_bad_files): %s", split, len(entries), "; ".join(entries))
  return Corpus(builder, tok, skipped, generate_s, prepare_s, synthetic.read_events(data_dir))


def from_config(config) -> Corpus:
  """`load` with a training config's data fields (ntxr/configs/default.py)."""
  return load(config.data_dir or None, cache_dir=os.path.expanduser(config.cache_dir),
              size=config.size, logmel=features.LogMelConfig(
                  sample_rate=config.sample_rate, n_fft=config.n_fft, f_min=config.f_min,
                  f_max=config.f_max, log_offset=config.log_offset),
              tokens="words" if config.word_vectors else config.tokens,
              vocab_size=config.vocab_size, cleaning=config.text_cleaning,
              vocabulary=config.vocabulary, skip_bad_files=config.skip_bad_files)
