"""Trains and evaluates a dual encoder under one negative-sampling strategy.

  python -m ntxr.main --strategy=semihard_cross
  python -m ntxr.main --strategy=hard_cross --data_dir=/path/to/Clotho \\
      --config=ntxr/configs/paper.py --word_vectors=/path/to/vectors.bin
  python -m ntxr.main --strategy=semihard_cross --eval_only

With no --data_dir the built-in synthetic corpus is generated (once) and used.
Rerunning a command resumes its workdir. Any config field can be set with
--config.FIELD=VALUE (see ntxr/configs/default.py). Training is data-parallel over
every local device, negatives drawn from the global batch; with --distributed, over
every device of every process (launch/run_tpu.sh, launch/run_slurm.sh).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ntxr import evaluate, parallel, sampling, train
from ntxr.data import workers

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "default.py"),
    "training configuration file (fields can be overridden: --config.num_epochs=8)")
_STRATEGY = flags.DEFINE_enum(
    "strategy", None, sorted(sampling.STRATEGIES),
    "negative-sampling strategy (default: the config's, semihard_cross)")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "where checkpoints, metrics and results go (default: workdir/STRATEGY)")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Clotho v2 folder (default: the built-in synthetic corpus)")
_WORD_VECTORS = flags.DEFINE_string(
    "word_vectors", None, "word2vec-format file (binary or text): frozen word embeddings")
_SCORE = flags.DEFINE_enum("score", None, ["alignment", "pooled"],
                           "audio-text score (default: the paper's alignment score)")
_SEED = flags.DEFINE_integer("seed", None, "random seed (default: the config's, 0)")
_EVAL_ONLY = flags.DEFINE_bool("eval_only", False,
                               "evaluate the workdir's best checkpoint without training")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "one of several processes (hosts): jax.distributed.initialize "
    "with the three flags below, which a Cloud TPU slice or SLURM job fills in if unset")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, with --distributed")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "how many processes, with --distributed")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process, with --distributed")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workers.die_with_launcher()  # a sweep's run ends with its sweep
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # libraries log every checkpoint at INFO
  if _DISTRIBUTED.value:
    parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config = _CONFIG.value
  for field, flag in [("strategy", _STRATEGY), ("data_dir", _DATA_DIR),
                      ("word_vectors", _WORD_VECTORS), ("score", _SCORE), ("seed", _SEED)]:
    if flag.value is not None:
      config[field] = flag.value
  workdir = _WORKDIR.value or os.path.join("workdir", config.strategy)
  run = train.evaluate_only if _EVAL_ONLY.value else train.train_and_evaluate
  try:
    results = run(config, workdir)
  except (FloatingPointError, FileNotFoundError, ValueError) as error:
    logging.error("%s", error)
    sys.exit(f"error: {error}")
  print(f"\n{config.strategy} on {results['split']} (epochs {results['epochs']}, best "
        f"{results['best_epoch']} by {results['selected_by']}, {results['seconds']:.0f} s "
        f"training; reported checkpoint collapsed: {results['collapse']}, epochs flagged: "
        f"{results['collapse_epochs'] or 'none'})")
  if results["skipped"]["count"]:
    print(f"{results['skipped']['count']} clips or rows left out when preparing the data: "
          + "; ".join(results["skipped"]["entries"]))
  print(evaluate.format_table(results))
  print(f"results: {os.path.join(workdir, 'results.json')}")


if __name__ == "__main__":
  app.run(main)
