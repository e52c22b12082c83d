"""Processes in tests: the ones a run started, read from /proc; a free port; waiting on
a condition while processes live (no heavy imports: pool workers load the test modules
that use this)."""

import errno
import os
import signal
import socket
import subprocess
import sys
import time


def descendants(pid: int) -> set:
  """Every live process below pid (from /proc)."""
  parents = {}
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/stat") as f:
        parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
      continue
  found, frontier = set(), {pid}
  while frontier:
    frontier = {child for child, parent in parents.items() if parent in frontier} - found
    found |= frontier
  return found


def alive(pids) -> set:
  def running(pid):
    try:
      with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
      return False
  return {pid for pid in pids if running(pid)}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_for(condition, processes, timeout: float) -> None:
  deadline = time.monotonic() + timeout
  while not condition():
    if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
      raise AssertionError(f"gave up waiting; exit codes {[p.poll() for p in processes]}")
    time.sleep(0.2)


def outliving(pids, timeout: float = 10.0) -> set:
  """The processes of pids still alive after waiting up to timeout for them to end."""
  deadline = time.monotonic() + timeout
  while alive(pids) and time.monotonic() < deadline:
    time.sleep(0.1)
  return alive(pids)


def reading_pipe(path, process, timeout: float = 60.0) -> int:
  """Waits until `process` opens the named pipe `path` (os.mkfifo) to read it; returns
  the pipe's write end, open and empty, so that the process waits in its read."""
  deadline = time.monotonic() + timeout
  while True:
    try:
      return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as error:
      if error.errno != errno.ENXIO:  # ENXIO: no reader yet
        raise
    if process.poll() is not None or time.monotonic() > deadline:
      raise AssertionError(f"{path} was never opened; exit code {process.poll()}")
    time.sleep(0.05)


def ctrl_c_while_reading(pipe, args: list) -> tuple:
  """(exit status, stderr, stdout) of `python -m` args sent Ctrl-C while it reads the named
  pipe `pipe`, which sends it nothing."""
  run = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
  writer = reading_pipe(pipe, run)
  run.send_signal(signal.SIGINT)
  stdout, stderr = run.communicate(timeout=60)
  os.close(writer)
  return run.returncode, stderr, stdout
