"""Generates (if needed) and prepares a corpus, then measures the input pipeline.

  python -m ntxr.data.prepare                           # the built-in synthetic corpus
  python -m ntxr.data.prepare --data_dir=/path/to/Clotho --sample_rate=44100

Prints the time to generate and to prepare, clips skipped, and training batches/s.
"""

import os
import time

from absl import app
from absl import flags

from ntxr.data import builders, clotho, features, input_pipeline, synthetic, tokenizer

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Clotho v2 folder; default: the built-in synthetic corpus")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", os.path.expanduser("~/.cache/ntxr"),
    "where the synthetic corpus, prepared TFRecords and tokenizer are kept")
_SIZE = flags.DEFINE_enum("size", "default", list(synthetic.SIZES), "synthetic corpus size")
_SAMPLE_RATE = flags.DEFINE_integer(
    "sample_rate", None, "feature sample rate (default: 16000 synthetic, 44100 Clotho)")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 1000, "sentencepiece vocabulary size")
_SKIP_BAD_FILES = flags.DEFINE_bool(
    "skip_bad_files", False, "leave out (and report) unreadable clips instead of failing")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "batch size for the throughput check")


def load(data_dir=None, *, cache_dir, size="default", sample_rate=None, vocab_size=1000,
         skip_bad_files=False):
  """(builder, tokenizer, timings) for a Clotho folder or the synthetic corpus."""
  timings = {}
  if data_dir is None:
    start = time.perf_counter()
    data_dir = synthetic.generate(os.path.join(cache_dir, f"synthetic_{size}"), size)
    timings["generate_s"] = time.perf_counter() - start
    sample_rate = sample_rate or synthetic.SAMPLE_RATE
  logmel = features.LogMelConfig(sample_rate=sample_rate or 44100)
  builder = builders.NtxrClotho(data_dir=os.path.join(cache_dir, "tfds"),
                                config=builders.clotho_config(logmel),
                                skip_bad_files=skip_bad_files)
  start = time.perf_counter()
  timings["skipped"] = builders.prepare(builder, data_dir)
  timings["prepare_s"] = time.perf_counter() - start
  development, _ = clotho.read_clotho_captions(
      os.path.join(data_dir, "clotho_captions_development.csv"), skip=skip_bad_files)
  model = tokenizer.train([c for clip in development for c in clip.captions],
                          os.path.join(data_dir, f"spm_{vocab_size}.model"), vocab_size)
  return builder, tokenizer.Tokenizer(model), timings


def main(argv):
  del argv
  builder, tok, timings = load(
      _DATA_DIR.value, cache_dir=_CACHE_DIR.value, size=_SIZE.value,
      sample_rate=_SAMPLE_RATE.value, vocab_size=_VOCAB_SIZE.value,
      skip_bad_files=_SKIP_BAD_FILES.value)
  batches = input_pipeline.train_batches(builder.as_dataset(split="development"), tok,
                                         batch_size=_BATCH_SIZE.value, seed=0)
  start, count = time.perf_counter(), 0
  for _ in input_pipeline.as_numpy(batches):
    count += 1
  seconds = time.perf_counter() - start
  skipped = sum(len(s) for s in timings["skipped"].values())
  print(f"generate: {timings.get('generate_s', 0):.1f} s, prepare: {timings['prepare_s']:.1f} s,"
        f" skipped clips or rows: {skipped}, vocabulary: {tok.vocab_size}")
  print(f"input pipeline: {count} batches of {_BATCH_SIZE.value} in {seconds:.1f} s "
        f"= {count / seconds:.1f} batches/s")


if __name__ == "__main__":
  app.run(main)
