"""A process's lifetime tied to the process that started it, however that one ends.

On Linux a process asks the kernel to SIGKILL it when its parent dies (SIGKILL of the
parent included). The data workers do so at their start; a command started with
`launcher_environment()` (the sweep's runs) does the same once it calls
`die_with_launcher()`.
"""

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_LAUNCHER = "NTXR_DIE_WITH"  # the environment variable naming a launching process


def die_with(parent: int) -> None:
  """Run in a new process: SIGKILL it when `parent`, the process that started it, ends."""
  if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  if os.getppid() != parent:  # the parent ended before the request took effect
    os._exit(1)


def launcher_environment(env=None) -> dict:
  """`env` (default: this process's) for a child command that should die with this
  process: the child calls `die_with_launcher()` first thing."""
  return dict(os.environ if env is None else env, **{_LAUNCHER: str(os.getpid())})


def die_with_launcher() -> None:
  """`die_with` the process that launched this one with `launcher_environment`, if any."""
  if _LAUNCHER in os.environ:
    die_with(int(os.environ[_LAUNCHER]))
