"""Worker processes for data preparation: light, and gone when their parent is gone.

`multiprocessing`'s spawned workers import the parent's `__main__` module, which for
`python -m ntxr.main` is all of TensorFlow and JAX (hundreds of MB each, for work that
needs NumPy and librosa). The pool here starts its workers with `__main__` hidden, so
they import only what their task's module imports, and on Linux each worker asks the
kernel to kill it when its parent dies, however the parent ends (SIGKILL included).
`die_with` does the same for any process started with `subprocess` (the sweep's runs).
"""

import contextlib
import ctypes
import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
import types

_PR_SET_PDEATHSIG = 1


def die_with(parent: int) -> None:
  """Run in a new process (a pool initializer, or `subprocess`'s preexec_fn): SIGKILL it
  when `parent`, the process that started it, ends."""
  if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  if os.getppid() != parent:  # the parent ended before the request took effect
    os._exit(1)


@contextlib.contextmanager
def _hidden_main():
  """Replaces `__main__` by an empty module while workers are spawned."""
  main = sys.modules["__main__"]
  sys.modules["__main__"] = types.ModuleType("__main__")
  try:
    yield
  finally:
    sys.modules["__main__"] = main


@contextlib.contextmanager
def pool(processes: int = 0):
  """A spawned `multiprocessing` pool of light workers (0: one per CPU core), terminated
  on exit. Tasks must be module-level functions of modules that stay light to import."""
  context = multiprocessing.get_context("spawn")
  with _hidden_main():
    workers = context.Pool(processes or os.cpu_count(), initializer=die_with,
                           initargs=(os.getpid(),))
  with workers:
    yield workers
