"""What every command does first (`start`), and TensorFlow's import without its noise.

Imports neither JAX nor TensorFlow, and defines no flag.
"""

import logging as std_logging
import os
import re
import sys
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging


def parse_flags(argv) -> list:
  """absl's flag parsing (`app.run(main, flags_parser=command.parse_flags)`), with a
  --config.FIELD that names no field said in one line (`unknown_field`)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:  # ml_collections: no such field
    unknown_field(error, argv)


def unknown_field(error: Exception, argv) -> NoReturn:
  """Says which --config.FIELD of argv names no field, and the closest that does, in one
  line instead of ml_collections' chained tracebacks; exits with status 2 (usage)."""
  named = re.findall(r"'([^'\\]+)", str(error))
  field = named[0] if named else str(error)
  given = next((arg.split("=")[0] for arg in argv[1:] if arg.startswith("--config.")
                and arg.split("=")[0].endswith(f".{field}")), f"--config.{field}")
  closest = re.search(r'Did you mean "([^"]+)"', str(error))
  hint = f"; did you mean {given[:-len(field)]}{closest.group(1)}?" if closest else ""
  print(f"error: {given}: no such config field{hint}", file=sys.stderr)
  sys.exit(2)


def start(argv) -> None:
  """What every command does first: refuses stray arguments, and unless --verbosity is
  given keeps the libraries' INFO logs (checkpoints, TensorFlow's C++ lines) quiet and
  prints warnings as "WARNING: message", without absl's time, thread and source line."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().setFormatter(
        std_logging.Formatter("%(levelname)s: %(message)s"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # read when TensorFlow loads


def import_tensorflow() -> None:
  """Imports TensorFlow, with the lines its C++ libraries print as they load (the oneDNN
  banner, which TF_CPP_MIN_LOG_LEVEL no longer silences) sent nowhere unless --verbosity
  is given. Call it before anything imports TensorFlow; errors still surface as
  Python exceptions."""
  if "tensorflow" in sys.modules or flags.FLAGS["verbosity"].present:
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import
    return
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import,redefined-outer-name
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
