"""Ctrl-C as ntxr's commands take it: one line on stderr and status 130, at any moment.

Imports only the standard library, so that a command sets it before its own imports.
"""

import contextlib
import os
import signal
import sys

INTERRUPTED = "interrupted: rerun the same command to resume"
AGAIN = "interrupted: rerun the same command to start again"  # a command that resumes nothing


def exit_at_once(line: str = INTERRUPTED) -> None:
  """From now on, Ctrl-C (SIGINT) ends the process at once: `line` on stderr, status 130.

  A command calls it first. Raised as KeyboardInterrupt, a Ctrl-C prints a traceback, and
  is lost where Python drops exceptions (JAX's garbage-collection callback) or turned into
  an ImportError (an extension module loading). Ending at once is safe: what ntxr writes
  is whole or not at all, and a killed run leaves nothing that blocks the rerun. Training
  sets its own handler while it trains (`train.StopRequests`), to save first.
  """
  stderr = os.dup(2)  # the terminal's, also while TensorFlow's import sends fd 2 nowhere

  def end(number, frame):
    del number, frame
    for stream in (sys.stdout, sys.stderr):
      with contextlib.suppress(Exception):  # a flush refused in the middle of a write
        stream.flush()
    os.write(stderr, f"{line}\n".encode())
    os._exit(130)
  signal.signal(signal.SIGINT, end)


@contextlib.contextmanager
def noted():
  """Within, Ctrl-C (SIGINT) is only noted: yields a function that says whether it came,
  for work that stops where it chooses. Puts the previous handler back."""
  came = []
  previous = signal.signal(signal.SIGINT, lambda number, frame: came.append(number))
  try:
    yield lambda: bool(came)
  finally:
    signal.signal(signal.SIGINT, previous)
