"""What every command does first (`start`), and TensorFlow's import without its noise.

Imports neither JAX nor TensorFlow, and defines no flag.
"""

import contextlib
import functools
import logging as std_logging
import os
import re
import sys
import traceback
import warnings
from typing import NoReturn

from absl import flags
from absl import logging


def _from_orbax(path: str) -> bool:
  return f"{os.sep}orbax{os.sep}" in path


_CHECKPOINTS = f"{os.sep}checkpoints{os.sep}"  # in the path of every file of a checkpoint


def given_twice(argv, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Ends the command in one line (exit 2) if argv, up to a "--", gives a flag twice that
  takes one value: absl keeps the last, and ml_collections joins a tuple field's two.
  argv is read as absl reads it: `--name VALUE` is one flag whatever VALUE starts with;
  a name flag_values lacks (absl's --flagfile, read each time) is left to absl."""
  seen, args = set(), iter(argv[1:])
  for arg in args:
    if arg == "--":
      break
    if not arg.startswith("-"):
      continue
    name = arg.lstrip("-").split("=")[0]
    if (name not in flag_values and name.startswith("no") and name[2:] in flag_values
        and flag_values[name[2:]].boolean):
      name = name[2:]  # --noflag
    if name not in flag_values:
      continue
    flag = flag_values[name]
    if "=" not in arg and not flag.boolean:
      next(args, None)  # its value
    if isinstance(flag, flags.MultiFlag) and not name.startswith("config."):
      continue  # a field's tuple is one value
    if name in seen:
      exit_with(f"--{name} is given twice: give it once", 2)
    seen.add(name)


def parse_flags(argv) -> list:
  """absl's flag parsing (`app.run(main, flags_parser=command.parse_flags)`), its errors
  (an unknown flag, a bad value, a required flag missing) in one line with exit status 2
  (usage) where absl exits 1, a --config.FIELD that names no field said with the closest
  that does (`unknown_field`), and a flag given twice refused (`given_twice`)."""
  given_twice(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    exit_with(error, 2)
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


def exit_with(error, status: int) -> NoReturn:
  """Ends the command with "error: ..." in one line on stderr and exit `status` (2: usage,
  the user must change the command; 1: a failure)."""
  print(f"error: {error}", file=sys.stderr)
  sys.exit(status)


@functools.cache
def quiet_failed_checkpoint_io() -> None:
  """Keeps a failed read or write of a checkpoint to the one error `checkpoints.Checkpoints`
  raises (`start` calls it).

  When one array of a checkpoint cannot be read or written, Orbax stops and closes its
  event loop while tensorstore still reads or writes the other arrays. As each ends it
  reports to the closed loop, and its coroutine is collected with the error inside:
  Python would print an "Event loop is closed", "Exception ignored in: <coroutine ...>"
  or "Task (Future, _GatheringFuture) exception was never retrieved" report for each
  array, and "coroutine ... was never awaited" at exit (ntxr has no coroutines of its
  own). Those reports (of Orbax's code, or naming a file in a checkpoints folder) are
  dropped, and so are Orbax's own error lines (a failed save logs four or five, from each
  of its threads), unless --verbosity is given: then they are kept without tracebacks.
  """
  report = sys.unraisablehook

  def hook(unraisable):
    closed_loop = (isinstance(unraisable.exc_value, RuntimeError)
                   and str(unraisable.exc_value) == "Event loop is closed")
    code = getattr(unraisable.object, "cr_code", None)
    if not (closed_loop or (code is not None and _from_orbax(code.co_filename))):
      report(unraisable)
  sys.unraisablehook = hook

  verbose = flags.FLAGS["verbosity"].present

  def quiet(record):
    if not _from_orbax(record.pathname):
      return True
    record.exc_info = record.exc_text = None
    return verbose or record.levelno < std_logging.ERROR
  logging.get_absl_logger().addFilter(quiet)

  def not_about_checkpoints(record):  # asyncio's "... exception was never retrieved"
    error, message = record.exc_info[1] if record.exc_info else None, record.getMessage()
    frames = traceback.extract_tb(error.__traceback__) if error is not None else []
    return not (_from_orbax(message) or any(_from_orbax(frame.filename) for frame in frames)
                or _CHECKPOINTS in message)
  std_logging.getLogger("asyncio").addFilter(not_about_checkpoints)
  warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)


def start(argv) -> None:
  """What every command does first: refuses stray arguments in one line (exit status 2,
  without absl's help), and unless --verbosity is
  given keeps the libraries' INFO logs (checkpoints, TensorFlow's C++ lines) quiet and
  prints warnings as "WARNING: message", without absl's time, thread and source line."""
  if len(argv) > 1:
    exit_with(f"unexpected arguments {argv[1:]}: flags are given as --name=value", 2)
  quiet_failed_checkpoint_io()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().setFormatter(
        std_logging.Formatter("%(levelname)s: %(message)s"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # read when TensorFlow loads


@contextlib.contextmanager
def c_stderr_silenced():
  """Within, what C libraries write to stderr (file descriptor 2) goes nowhere; Python's
  sys.stderr is flushed before and reaches it again after."""
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def import_tensorflow() -> None:
  """Imports TensorFlow, with the lines its C++ libraries print as they load (the oneDNN
  banner, which TF_CPP_MIN_LOG_LEVEL no longer silences) sent nowhere unless --verbosity
  is given. Call it before anything imports TensorFlow; errors still surface as
  Python exceptions."""
  if "tensorflow" in sys.modules or flags.FLAGS["verbosity"].present:
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import
    return
  with c_stderr_silenced():
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import,redefined-outer-name
