"""The flags several commands share, each defined by the command that reads it (absl, as
in the Flax examples); the strategies and objectives they list are `ntxr.specs`'.

Importing this module defines no flag: a command calls `define_config()` and the like
where it starts, so its `--helpfull` lists only what it reads. Imports neither JAX nor
TensorFlow, so a command's `--help` answers at once.
"""

import os
import re
import sys

from absl import flags
import ml_collections
from ml_collections import config_flags

from ntxr import command, specs

FLAGS = flags.FLAGS


DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")


def define_config(flag_values: flags.FlagValues = FLAGS, argv=None) -> None:
  """--config: a config file whose fields --config.FIELD=VALUE overrides (FLAGS.config).
  A --config that names no file is refused in one line (exit status 2)."""
  argv = sys.argv if argv is None else argv
  check_config_file(argv)
  try:  # ml_collections reads the overrides of the command line as the flag is defined
    config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "training configuration file; any field can be set with "
        "--config.FIELD=VALUE (ntxr/configs/default.py lists them)",
        flag_values=flag_values, sys_argv=argv)
  except (AttributeError, KeyError) as error:  # a --config.FIELD that names no field
    command.unknown_field(error, argv)


def check_config_file(argv) -> None:
  """Exits with one line (status 2) if argv's --config names no readable file, which
  ml_collections reports in tracebacks, or blames on a --config.FIELD override."""
  given = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    named = re.fullmatch(r"--?config(?:=(.*))?", arg, re.DOTALL)
    if named:
      given = named.group(1) if named.group(1) is not None else (
          argv[i + 1] if i + 1 < len(argv) else "")
  if given is None:
    return
  path = given.split(":", 1)[0]  # what follows a colon goes to get_config
  if os.path.isdir(path):
    command.exit_with(f"--config={given}: a folder, not a config file", 2)
  if not os.path.isfile(path):
    command.exit_with(f"--config={given}: no such file", 2)
  if not os.access(path, os.R_OK):
    command.exit_with(f"--config={given}: cannot be read (permission denied)", 2)


def config_of(args, only_config: bool = True) -> ml_collections.ConfigDict:
  """The config `ntxr.main` reads from its arguments `args`: their --config and
  --config.FIELD flags, as --name=value or --name value. Any other argument is a
  ValueError, or with only_config=False left to ntxr.main."""
  values, argv = flags.FlagValues(), ["ntxr.main", *args]
  define_config(values, argv)  # and a flag for each --config.FIELD given
  command.given_twice(argv, values)
  values.set_gnu_getopt(not only_config)  # then read on past a value of ntxr.main's flags
  try:
    unparsed = values(argv, known_only=not only_config)
  except flags.UnrecognizedFlagError as error:  # one of ntxr.main's other flags
    raise ValueError(f"only --config flags can be given to runs trained together ({error})"
                     ) from None
  except flags.Error as error:  # a value that does not parse
    raise ValueError(error) from None
  except (AttributeError, KeyError) as error:
    command.unknown_field(error, argv)
  if only_config and len(unparsed) > 1:
    raise ValueError(f"unexpected arguments for the runs: {unparsed[1:]}")
  return values.config


def define_workdir(help_text: str) -> None:
  flags.DEFINE_string("workdir", None, help_text)


def define_json() -> None:
  flags.DEFINE_string("json", None, "also write the command's results to this JSON file")


def define_strategies(default_all: bool) -> None:
  """--strategies (FLAGS.strategies; read with `chosen`)."""
  flags.DEFINE_list("strategies", [], "negative-sampling strategies of the triplet loss, "
                    f"from {','.join(specs.STRATEGIES)}"
                    + (" (default: every one)" if default_all else ""))


def define_objectives() -> None:
  """--objectives (FLAGS.objectives; read with `chosen`)."""
  flags.DEFINE_list("objectives", [], "objectives other than the triplet loss, from "
                    + ",".join(specs.objectives_without_strategy()))


def chosen(flag: str, names, default=()) -> list:
  """The names given to list flag `flag`, each checked against `names`; `default` if none.
  Raises ValueError naming the unknown ones."""
  given = FLAGS[flag].value
  unknown = sorted(set(given) - set(names))
  if unknown:
    raise ValueError(f"--{flag}: unknown {unknown}; choose from {list(names)}")
  return list(given or default)
