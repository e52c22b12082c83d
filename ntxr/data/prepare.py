"""Generates (if needed) and prepares a corpus, then measures the input pipeline.

  python -m ntxr.data.prepare                           # the built-in synthetic corpus
  python -m ntxr.data.prepare --data_dir=/path/to/Clotho --sample_rate=44100

Prints the time to generate and to prepare, clips skipped, and training batches/s.
"""

import os
import time

from absl import app
from absl import flags

from ntxr.data import corpus, input_pipeline, synthetic

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Clotho v2 folder; default: the built-in synthetic corpus")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", os.path.expanduser("~/.cache/ntxr"),
    "where the synthetic corpus, prepared TFRecords and tokenizer are kept")
_SIZE = flags.DEFINE_enum("size", "default", list(synthetic.SIZES), "synthetic corpus size")
_SAMPLE_RATE = flags.DEFINE_integer(
    "sample_rate", None, "feature sample rate (default: 16000 synthetic, 44100 Clotho)")
_TOKENS = flags.DEFINE_enum("tokens", "sentencepiece", list(corpus.TOKENS),
                            "caption tokens: sentencepiece pieces or whole words")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 1000, "sentencepiece vocabulary size")
_SKIP_BAD_FILES = flags.DEFINE_bool(
    "skip_bad_files", False, "leave out (and report) unreadable clips instead of failing")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "batch size for the throughput check")


def main(argv):
  del argv
  builder, tok, timings = corpus.load(
      _DATA_DIR.value, cache_dir=_CACHE_DIR.value, size=_SIZE.value,
      sample_rate=_SAMPLE_RATE.value, tokens=_TOKENS.value, vocab_size=_VOCAB_SIZE.value,
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
