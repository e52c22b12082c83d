"""What every command does first (`start`), and TensorFlow's import without its noise.

Imports neither JAX nor TensorFlow, and defines no flag.
"""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging


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
