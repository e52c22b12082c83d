"""Where a result came from: the date, the checkout's commit, the package versions and
the CPU (XLA compiles for the CPU it runs on, so another CPU model may move the last
digits of a run's metrics). No JAX or TensorFlow here: the benchmark's machines may lack
TensorFlow.

  provenance.of("python -m ntxr.bench --jobs=kernels")
  # {"date": "2026-12-06T23:59:00+00:00", "commit": "2fa29ae4c1d0", "versions": {...},
  #  "cpu": "AMD EPYC", "command": "python -m ntxr.bench --jobs=kernels"}
"""

import datetime
import importlib.metadata
import os
import platform
import subprocess
from typing import Optional

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tensorflow",
            "tensorflow-cpu", "torch", "transformers", "hear21passt", "panns-inference")


def commit() -> Optional[str]:
  """The checkout's commit, with "+changes" when tracked files differ from it; None
  outside git (an installed package)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           check=True, capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return head + ("+changes" if dirty else "")


def versions() -> dict:
  """{package: version} of Python and the PACKAGES installed."""
  found = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def cpu() -> str:
  """The CPU's model name: Linux's /proc/cpuinfo, else what `platform` says."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def now() -> str:
  """The date and time in UTC, to the second, as ISO 8601."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def of(command: Optional[str] = None) -> dict:
  """{date (UTC, now), commit, versions, cpu} and the command, if given."""
  found = dict(date=now(), commit=commit(), versions=versions(), cpu=cpu())
  return dict(found, command=command) if command else found
