"""Writing files so that an interrupted run never leaves a half-written one."""

import json
import os
from typing import Callable


def write_atomically(path: str, write: Callable[[str], None]) -> None:
  """write(temporary path) next to `path`, then rename it into place."""
  partial = f"{path}.partial-{os.getpid()}"
  write(partial)
  os.replace(partial, path)


def write_text(path: str, text: str) -> None:
  def write(partial):
    with open(partial, "w", newline="", encoding="utf-8") as f:
      f.write(text)
  write_atomically(path, write)


def write_json(path: str, value) -> None:
  write_text(path, json.dumps(value, indent=2))
