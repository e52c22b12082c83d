"""One call from a data folder (or none: the built-in corpus) to prepared clips and a tokenizer."""

import contextlib
import fcntl
import hashlib
import os
import time

from ntxr.data import builders, clotho, features, synthetic, tokenizer

TOKENS = ("sentencepiece", "words")


def _tokenizer(kind: str, captions: list, data_dir: str, vocab_size: int):
  """The caption tokenizer of `kind`, trained once and cached in data_dir."""
  if kind == "words":
    return tokenizer.WordTokenizer(
        tokenizer.train_words(captions, os.path.join(data_dir, "words.txt")))
  return tokenizer.Tokenizer(
      tokenizer.train(captions, os.path.join(data_dir, f"spm_{vocab_size}.model"), vocab_size))


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


def load(data_dir=None, *, cache_dir, size="default", sample_rate=None, tokens="sentencepiece",
         vocab_size=1000, skip_bad_files=False):
  """(builder, tokenizer, timings) for a Clotho folder or the synthetic corpus.

  tokens: "sentencepiece" (vocab_size pieces) or "words" (every development word).
  """
  with _exclusive(os.path.join(cache_dir, "lock")):
    return _load(data_dir, cache_dir, size, sample_rate, tokens, vocab_size, skip_bad_files)


def _load(data_dir, cache_dir, size, sample_rate, tokens, vocab_size, skip_bad_files):
  timings = {}
  if data_dir is None:
    start = time.perf_counter()
    data_dir = synthetic.generate(os.path.join(cache_dir, f"synthetic_{size}"), size)
    timings["generate_s"] = time.perf_counter() - start
    sample_rate = sample_rate or synthetic.SAMPLE_RATE
  logmel = features.LogMelConfig(sample_rate=sample_rate or 44100)
  builder = builders.NtxrClotho(data_dir=_prepared_dir(cache_dir, data_dir),
                                config=builders.clotho_config(logmel),
                                skip_bad_files=skip_bad_files)
  start = time.perf_counter()
  timings["skipped"] = builders.prepare(builder, data_dir)
  timings["prepare_s"] = time.perf_counter() - start
  development, _ = clotho.read_clotho_captions(
      os.path.join(data_dir, "clotho_captions_development.csv"), skip=skip_bad_files)
  captions = [c for clip in development for c in clip.captions]
  return builder, _tokenizer(tokens, captions, data_dir, vocab_size), timings
