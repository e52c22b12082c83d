"""Worker processes for data preparation: light, and gone when their parent is gone.

`multiprocessing`'s spawned workers import the parent's `__main__` module, which for
`python -m ntxr.main` is all of TensorFlow and JAX (hundreds of MB each, for work that
needs NumPy and librosa). The pool here starts its workers with `__main__` hidden, so
they import only what their task's module imports, and on Linux each worker asks the
kernel to kill it when its parent dies, however the parent ends (SIGKILL included).
`imap` keeps jobs too few to repay the workers' start in the calling process.
"""

import contextlib
import multiprocessing
import os
import signal
import sys
import types
from typing import Callable, Iterator

from ntxr import lifetime

# A worker's start imports librosa and SciPy, which costs as much as many clips' features:
# a pool is worth it only with this many jobs per worker.
JOBS_PER_WORKER = 128

@contextlib.contextmanager
def _hidden_main():
  """Replaces `__main__` by an empty module while workers are spawned."""
  main = sys.modules["__main__"]
  sys.modules["__main__"] = types.ModuleType("__main__")
  try:
    yield
  finally:
    sys.modules["__main__"] = main


def _start_worker(parent: int) -> None:
  """A worker's start: it dies with `parent`, and leaves Ctrl-C to it (a terminal sends
  SIGINT to every process of the command, and a worker's KeyboardInterrupt would print
  a traceback)."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  lifetime.die_with(parent)


@contextlib.contextmanager
def _pool(processes: int):
  """A spawned `multiprocessing` pool of `processes` light workers, terminated on exit."""
  context = multiprocessing.get_context("spawn")
  with _hidden_main():
    workers = context.Pool(processes, initializer=_start_worker, initargs=(os.getpid(),))
  with workers:
    yield workers


@contextlib.contextmanager
def imap(function: Callable, jobs: list, processes: int = 0, chunksize: int = 1) -> Iterator:
  """A context manager: inside it, function(job) for each job, in order, each as soon as
  it is done, from a pool of light worker processes (terminated when the block ends,
  however it ends), or from this process when a pool would cost more than it saves.

    with workers.imap(features.features_or_error, jobs, chunksize=8) as results:
      for result in results: ...

  `function` must be a module-level function of a module that stays light to import.
  processes: 0 sizes the pool to the work (one worker per CPU core, at most one per
  JOBS_PER_WORKER jobs); fewer than 2 runs the jobs here.
  """
  processes = processes or min(os.cpu_count(), len(jobs) // JOBS_PER_WORKER)
  if processes < 2:
    yield map(function, jobs)
    return
  with _pool(processes) as workers:
    yield workers.imap(function, jobs, chunksize)
