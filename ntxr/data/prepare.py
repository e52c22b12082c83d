"""Generates (if needed) and prepares a corpus, then measures the input pipeline.

  python -m ntxr.data.prepare                           # the built-in synthetic corpus
  python -m ntxr.data.prepare --config=ntxr/configs/paper.py --config.data_dir=/path/to/Clotho

It reads the same `--config` as `ntxr.main`, so it prepares exactly what training will
read. Prints the time to generate and to prepare, clips skipped, and training batches/s.
"""

import time

from ntxr import ctrl_c

if __name__ == "__main__":  # first: a Ctrl-C while the imports below load costs one line
  ctrl_c.exit_at_once()

# pylint: disable=wrong-import-position
from absl import app
from absl import flags

from ntxr import cli, command, settings
# pylint: enable=wrong-import-position

FLAGS = flags.FLAGS


def main(argv):
  command.start(argv)
  config = FLAGS.config
  try:  # before TensorFlow loads: a mistake costs a second, not several
    data = settings.Settings.of(config).data
  except settings.SettingError as error:
    command.exit_with(error, 2)
  command.import_tensorflow()
  from ntxr.data import corpus, input_pipeline  # pylint: disable=import-outside-toplevel
  try:
    prepared = corpus.load_data(data)
  except (FileNotFoundError, ValueError) as error:  # a bad folder, file or row, named
    command.exit_with(error, 1)
  batches = input_pipeline.train_batches(
      prepared.builder.as_dataset(split=prepared.splits[0]), prepared.tokenizer,
      batch_size=config.batch_size, seed=0, frame_buckets=config.frame_buckets,
      max_tokens=config.max_tokens)
  start, count = time.perf_counter(), 0
  for _ in input_pipeline.as_numpy(batches):
    count += 1
  seconds = time.perf_counter() - start
  skipped = sum(len(s) for s in prepared.skipped.values())
  print(f"generate: {prepared.generate_s:.1f} s, prepare: {prepared.prepare_s:.1f} s, "
        f"skipped clips or rows: {skipped}, vocabulary: {prepared.tokenizer.vocab_size}")
  print(f"input pipeline: {count} batches of {config.batch_size} in {seconds:.1f} s "
        f"= {count / seconds:.1f} batches/s")


if __name__ == "__main__":
  cli.define_config()
  app.run(main, flags_parser=command.parse_flags)
