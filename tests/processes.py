"""The processes a run started, read from /proc (no heavy imports: pool workers load
the test modules that use this)."""

import os


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
