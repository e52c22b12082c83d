"""The files a run writes, in a local folder or a bucket (gs://...), written so that an
interrupted run never leaves a half-written one.

Bucket paths go through etils.epath, which reaches them with tf.io.gfile where TensorFlow
is installed, or fsspec's gcsfs with EPATH_USE_TF=false. A local file is written next to
its place and renamed into it; an object in a bucket appears whole when its upload ends,
so it is uploaded in one piece. Buckets have no appends: `append_line` rewrites the object.
"""

import contextlib
import csv
import fcntl
import glob
import io
import json
import os
import shutil
from typing import Optional

from absl import logging
from etils import epath


class Locked(RuntimeError):
  """Another live process holds the lock (`locked(..., wait=False)`); the message is the
  holder's line."""


@contextlib.contextmanager
def locked(path: str, *, wait: bool, holder: Optional[str] = None):
  """Holds an exclusive lock on the local file `path` (made with its folder if needed).

  The lock is the kernel's (flock), so it ends with its process: one left by a killed
  process blocks nothing. wait: wait for another holder to let go, else raise Locked
  with what that holder wrote; holder: a line written into the file while it is held.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a+") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
      lock.seek(0)
      raise Locked(lock.read().strip()) from None
    if holder is not None:
      lock.truncate(0)
      lock.write(holder + "\n")
      lock.flush()
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def is_bucket(path) -> bool:
  """Whether `path` names an object store (gs://, s3://) rather than a local path."""
  return "://" in os.fspath(path)


def exists(path) -> bool:
  return epath.Path(path).exists()


def makedirs(path) -> None:
  """Makes a local folder and its parents (a bucket has no folders to make)."""
  if not is_bucket(path):
    os.makedirs(path, exist_ok=True)


def check_folder(flag: str, path: str) -> None:
  """Raises ValueError if the folder `path` given as --`flag` cannot be made or written in:
  a file, under a file, or under a folder this process cannot write in. A bucket path is
  left to its first write."""
  if is_bucket(path):
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"--{flag}={path} is a file, not a folder: give a folder")
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"--{flag}={path}: {existing} is a file, not a folder")
  if not os.access(existing, os.W_OK):
    raise ValueError(f"--{flag}={path}: cannot write in {existing}")


def check_output(flag: str, path: str, inputs: dict, data_dir: Optional[str] = None) -> None:
  """Raises ValueError, before any work is done, if the output file `path` given as
  --`flag` cannot be written as a new file of its own: a folder, in a folder that is
  missing or read-only, one of the command's `inputs` ({flag: path}, None for not given),
  or inside `data_dir`, a user's data folder, which ntxr never writes in. A bucket path
  is left to its upload."""
  if is_bucket(path):
    return
  given, path = path, os.path.abspath(os.path.expanduser(path))
  folder = os.path.dirname(path)
  if os.path.isdir(path):
    raise ValueError(f"--{flag}={given} is a folder: give a file name")
  if not os.path.isdir(folder):
    raise ValueError(f"--{flag}={given}: no folder {folder}")
  if not os.access(folder, os.W_OK):
    raise ValueError(f"--{flag}={given}: cannot write in {folder}")
  for other, source in inputs.items():
    source = source and os.path.expanduser(source)
    if source and os.path.exists(path) and os.path.exists(source) and os.path.samefile(
        path, source):
      raise ValueError(f"--{flag}={given} is the file --{other} reads: give another file "
                       "to write")
  if data_dir and os.path.isdir(os.path.expanduser(data_dir)):
    real = os.path.realpath(os.path.expanduser(data_dir))
    if os.path.commonpath([os.path.realpath(path), real]) == real:
      raise ValueError(f"--{flag}={given} is inside {data_dir}, a data folder ntxr only "
                       "reads: write it elsewhere")


def names(folder) -> list:
  """The names in `folder`, local or in a bucket; [] if there is no such folder."""
  path = epath.Path(folder)
  return [p.name for p in path.iterdir()] if path.is_dir() else []


def read_bytes(path) -> bytes:
  return epath.Path(path).read_bytes()


def read_text(path) -> str:
  return epath.Path(path).read_text(encoding="utf-8")


PARTIAL = ".partial-"  # in the name of what a process writes before renaming it


def partial_path(path: str) -> str:
  """Where this process writes a local file before renaming it to `path`."""
  return f"{path}{PARTIAL}{os.getpid()}"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's
    return True
  return True


def remove_left_by_dead(path: str) -> list:
  """Removes the partial files and folders of `path` (`partial_path`, or that name with
  "-" and more after the pid) whose process is gone: what killed processes left. Returns
  what it removed."""
  removed = []
  for leftover in glob.glob(f"{glob.escape(path)}{PARTIAL}*"):
    pid = leftover[len(path) + len(PARTIAL):].split("-")[0]
    if pid.isdigit() and not _alive(int(pid)):
      if os.path.isdir(leftover):
        shutil.rmtree(leftover, ignore_errors=True)
      else:
        os.remove(leftover)
      removed.append(leftover)
  return removed


def write_bytes(path, data: bytes) -> None:
  """Writes `data` at `path` whole or not at all."""
  if is_bucket(path):
    epath.Path(path).write_bytes(data)
    return
  with open(partial_path(path), "wb") as f:
    f.write(data)
  os.replace(partial_path(path), path)


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path, value) -> None:
  write_text(path, json.dumps(value, indent=2))


def write_csv(path, header: list, rows) -> None:
  """Writes a CSV file, `header` then `rows` (whole or not at all); `read_csv` reads it."""
  text = io.StringIO(newline="")
  writer = csv.writer(text)
  writer.writerow(header)
  writer.writerows(rows)
  write_text(path, text.getvalue())


def append_line(path, line: str) -> None:
  """Adds `line` and a newline at the end of the text file `path` (made if missing)."""
  if is_bucket(path):
    write_text(path, (read_text(path) if exists(path) else "") + line + "\n")
    return
  with open(path, "a", encoding="utf-8") as f:
    f.write(line + "\n")


def file_tree(root) -> list:
  """Every file under the folder `root` (local or in a bucket), as sorted paths relative
  to it; [] where there is none."""
  bare = lambda path: os.fspath(path).split("://", 1)[-1].rstrip("/")  # walk drops gs://
  found = []
  for folder, _, names in epath.Path(root).walk():
    relative = os.path.relpath(bare(folder), bare(root))
    found += [os.path.normpath(os.path.join(relative, name)) for name in names]
  return sorted(found)


def copy_file(source, destination) -> None:
  """Copies one file, between local folders and buckets either way, written whole."""
  makedirs(os.path.dirname(os.fspath(destination)))
  write_bytes(destination, read_bytes(source))


def read_jsonl(path) -> list:
  """A JSON-lines file's records ([] if there is no file). A line that does not parse, as
  a kill or a full disk during an append leaves, is dropped with a warning naming it."""
  if not exists(path):
    return []
  records = []
  text = read_bytes(path).decode("utf-8", errors="replace")
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as error:
      logging.warning("%s:%d: dropped a torn or partial line (%s): %.80s", path, number,
                      error, line.rstrip())
  return records


def read_utf8(path) -> str:
  """A UTF-8 text file's text, without a byte-order mark if it has one; ValueError naming
  the file and the line of its first byte that is not UTF-8."""
  data = read_bytes(path)
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as error:
    line = data[:error.start].count(b"\n") + 1
    raise ValueError(f"{path}:{line}: not UTF-8 text (byte {data[error.start]:#04x}); save "
                     "the file as UTF-8") from None


def read_csv(path) -> list:
  """[(line, fields)] of every record of a UTF-8 CSV file, its header first; line is the
  record's first line. A byte-order mark (spreadsheets' "CSV UTF-8") is dropped and
  Windows line endings are read as any other.

  Raises FileNotFoundError naming the file, or ValueError naming a folder given for it
  or the line of the first byte that is not UTF-8.
  """
  if not exists(path):
    raise FileNotFoundError(f"{path}: file not found")
  if epath.Path(path).is_dir():
    raise ValueError(f"{path}: a folder, not a CSV file")
  reader = csv.reader(io.StringIO(read_utf8(path), newline=""))
  records, start = [], 1
  for fields in reader:
    if fields:  # a blank line holds no record
      records.append((start, fields))
    start = reader.line_num + 1
  return records
