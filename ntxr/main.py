"""Trains and evaluates a dual encoder under one negative-sampling strategy or objective.

  python -m ntxr.main --strategy=semihard_cross
  python -m ntxr.main --objective=infonce
  python -m ntxr.main --strategy=hard_cross --config=ntxr/configs/paper.py \\
      --config.data_dir=/path/to/Clotho --config.word_vectors=/path/to/vectors.bin
  python -m ntxr.main --strategy=semihard_cross --eval_only

With no --config.data_dir the built-in synthetic corpus is generated (once) and used.
Rerunning a command resumes its workdir. Any config field can be set with
--config.FIELD=VALUE (see ntxr/configs/default.py). Training is data-parallel over
every local device, negatives drawn from the global batch; with --distributed, over
every device of every process (launch/run_tpu.sh, launch/run_slurm.sh).
"""

import os
import sys

from ntxr import ctrl_c

if __name__ == "__main__":  # first: a Ctrl-C while the imports below load costs one line
  ctrl_c.exit_at_once()

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
from absl import logging

from ntxr import cli, command, specs
# pylint: enable=wrong-import-position

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This command's flags (defined where it starts, not when ntxr.main is imported)."""
  cli.define_config()
  cli.define_workdir("the run's folder: checkpoints, metrics and results (default: "
                     "workdir/RUN, RUN the strategy or objective)")
  for shared in ("config", "workdir"):  # listed by --help beside this module's own flags
    flags.declare_key_flag(shared)
  flags.DEFINE_enum("strategy", None, sorted(specs.STRATEGIES),
                    "negative-sampling strategy (default: the config's, semihard_cross)")
  flags.DEFINE_enum("objective", None, sorted(specs.OBJECTIVES),
                    "training objective (default: the config's, the paper's triplet loss "
                    "with --strategy)")
  flags.DEFINE_bool("eval_only", False, "evaluate the workdir's best checkpoint without "
                    "training")
  flags.DEFINE_bool("check_settings", False, "only check the flags and the settings' values "
                    "and exit (the launch scripts do, before a cluster starts the run; the "
                    "files and folders named are checked where it starts)")
  flags.DEFINE_bool("distributed", False, "one of several processes (hosts): "
                    "jax.distributed.initialize with the three flags below, which a Cloud "
                    "TPU slice or SLURM job fills in if unset")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, with --distributed")
  flags.DEFINE_integer("num_processes", None, "how many processes, with --distributed")
  flags.DEFINE_integer("process_id", None, "this process, with --distributed")
  flags.DEFINE_integer("heartbeat_timeout_seconds", 100, "with --distributed: after this "
                       "long without word from a process (killed, say) the others stop with "
                       "an error instead of waiting")


def main(argv):
  command.start(argv)
  # pylint: disable=import-outside-toplevel  (JAX, then TensorFlow, load after --help)
  import jax
  from ntxr import settings, workdir as workdir_lib
  config = FLAGS.config
  if (FLAGS.strategy and FLAGS.objective
      and not specs.OBJECTIVES[FLAGS.objective].takes_strategy):
    taking = tuple(n for n, o in specs.OBJECTIVES.items() if o.takes_strategy)
    command.exit_with(f"--objective={FLAGS.objective} takes no --strategy (it scores the "
                      f"whole pool; a strategy picks the negatives of {taking}): "
                      "give one of the two", 2)
  if FLAGS.strategy:  # the fields the command names, as the paper's table does
    config.strategy = FLAGS.strategy
  if FLAGS.objective:
    config.objective = FLAGS.objective
  try:  # the settings, before TensorFlow loads and anything is written
    if FLAGS.check_settings:
      settings.check_values(config)
      warn_unused(config)
      return
    workdir = FLAGS.workdir or os.path.join("workdir", settings.run_name(config))
    settings.check(workdir, config)
    warn_unused(config)
    if FLAGS.eval_only:
      workdir_lib.check_trained(workdir)
  except settings.SettingError as error:
    command.exit_with(error, 2)
  command.import_tensorflow()
  from ntxr import evaluate, lifetime, parallel, train
  lifetime.die_with_launcher()  # a sweep's run ends with its sweep
  if FLAGS.distributed:
    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                        FLAGS.heartbeat_timeout_seconds)
  run = train.evaluate_only if FLAGS.eval_only else train.train_and_evaluate
  results = run_or_exit(run, config, workdir)
  if jax.process_index() != 0:  # the first process reports for all
    return
  print("\n" + evaluate.report(settings.run_name(config), results,
                               os.path.join(workdir, "results.json")))


def warn_unused(config) -> None:
  """Logs the config's fields that its pretrained encoders do not read, if any."""
  from ntxr import settings  # pylint: disable=import-outside-toplevel
  unused = settings.unused_fields(config)
  if unused:
    logging.warning("%s: not read with --config.audio_encoder=%s, --config.text_encoder=%s "
                    "(a pretrained encoder has its own front end or tokenizer)",
                    ", ".join(unused), config.audio_encoder, config.text_encoder)


def run_or_exit(run, *args):
  """run(*args) (training or testing), its failures ended in one line on stderr: exit 1,
  or 130 for a Ctrl-C that training stopped at (its state saved: rerun to resume), or 2
  for a setting that only the devices or the data could check."""
  # pylint: disable=import-outside-toplevel
  from ntxr import settings, train, workdir as workdir_lib
  try:
    return run(*args)
  except train.Stopped as stopped:
    print(f"stopped: {stopped}", file=sys.stderr)
    sys.exit(130 if stopped.interrupted else 1)
  except settings.SettingError as error:
    command.exit_with(error, 2)
  except (FloatingPointError, FileNotFoundError, ValueError,
          workdir_lib.WorkdirError) as error:
    command.exit_with(error, 1)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=command.parse_flags)
