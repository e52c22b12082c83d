"""Writing files so that an interrupted run never leaves a half-written one."""

import json
import os
from typing import Callable

from absl import logging


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


def read_jsonl(path: str) -> list:
  """A JSON-lines file's records ([] if there is no file). A line that does not parse, as
  a kill or a full disk during an append leaves, is dropped with a warning naming it."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as error:
        logging.warning("%s:%d: dropped a torn or partial line (%s): %.80s", path, number,
                        error, line.rstrip())
  return records
