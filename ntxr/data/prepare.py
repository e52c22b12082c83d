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


def _define_flags():
  """Flags exist only when this module runs as a command (main.py has its own)."""
  flags.DEFINE_string(
      "data_dir", None, "Clotho v2 folder; default: the built-in synthetic corpus")
  flags.DEFINE_string(
      "cache_dir", os.path.expanduser("~/.cache/ntxr"),
      "where the synthetic corpus, prepared TFRecords and tokenizer are kept")
  flags.DEFINE_enum("size", "default", list(synthetic.SIZES), "synthetic corpus size")
  flags.DEFINE_integer(
      "sample_rate", None, "feature sample rate (default: 16000 synthetic, 44100 Clotho)")
  flags.DEFINE_enum("tokens", "sentencepiece", list(corpus.TOKENS),
                    "caption tokens: sentencepiece pieces or whole words")
  flags.DEFINE_integer("vocab_size", 1000, "sentencepiece vocabulary size")
  flags.DEFINE_bool(
      "skip_bad_files", False, "leave out (and report) unreadable clips instead of failing")
  flags.DEFINE_integer("batch_size", 32, "batch size for the throughput check")


def main(argv):
  del argv
  builder, tok, timings = corpus.load(
      flags.FLAGS.data_dir, cache_dir=flags.FLAGS.cache_dir, size=flags.FLAGS.size,
      sample_rate=flags.FLAGS.sample_rate, tokens=flags.FLAGS.tokens, vocab_size=flags.FLAGS.vocab_size,
      skip_bad_files=flags.FLAGS.skip_bad_files)
  batches = input_pipeline.train_batches(builder.as_dataset(split="development"), tok,
                                         batch_size=flags.FLAGS.batch_size, seed=0)
  start, count = time.perf_counter(), 0
  for _ in input_pipeline.as_numpy(batches):
    count += 1
  seconds = time.perf_counter() - start
  skipped = sum(len(s) for s in timings["skipped"].values())
  print(f"generate: {timings.get('generate_s', 0):.1f} s, prepare: {timings['prepare_s']:.1f} s,"
        f" skipped clips or rows: {skipped}, vocabulary: {tok.vocab_size}")
  print(f"input pipeline: {count} batches of {flags.FLAGS.batch_size} in {seconds:.1f} s "
        f"= {count / seconds:.1f} batches/s")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
