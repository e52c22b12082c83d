"""A prepared-data cache in a bucket (gs://...), kept in a local folder on each machine:
a machine downloads a prepared folder the bucket holds whole, or prepares it and uploads
it, so that it is prepared once for every worker and every relaunch."""

import hashlib
import os
import shutil

from absl import logging

from ntxr import files

STAGE_DIR = "~/.cache/ntxr/staged"  # where a bucket cache's local copies live
UPLOADED = "ntxr_uploaded.json"  # in a bucket's prepared folder, written after its files


def digest(text: str) -> str:
  """A short name for a path: the first 8 hex digits of its SHA-1."""
  return hashlib.sha1(text.encode()).hexdigest()[:8]


def local_copy(cache_dir: str, stage_dir: str) -> str:
  """The local folder that stands for the bucket cache_dir on this machine."""
  name = os.path.basename(cache_dir.rstrip("/"))
  return os.path.join(os.path.expanduser(stage_dir), f"{name}-{digest(cache_dir)}")


def _is_leftover(name: str) -> bool:
  """Whether a prepared folder's file is what an interrupted write left behind."""
  return "incomplete" in name or files.PARTIAL in name


def download(bucket_copy: str, prepared: str) -> None:
  """Copies a prepared folder the bucket holds whole into `prepared`, if that is missing:
  into a partial folder first, renamed into place once every file is there."""
  if os.path.isdir(prepared) or not files.exists(f"{bucket_copy}/{UPLOADED}"):
    return
  files.remove_left_by_dead(prepared)  # killed downloads
  partial = files.partial_path(prepared)
  shutil.rmtree(partial, ignore_errors=True)
  names = [name for name in files.file_tree(bucket_copy) if name != UPLOADED]
  for name in names:
    files.copy_file(f"{bucket_copy}/{name}", os.path.join(partial, name))
  os.replace(partial, prepared)
  logging.info("downloaded the prepared data (%d files) from %s", len(names), bucket_copy)


def upload(prepared: str, bucket_copy: str) -> None:
  """Uploads the files of `prepared` the bucket lacks, then marks the bucket's copy whole."""
  present = set(files.file_tree(bucket_copy))
  names = [name for name in files.file_tree(prepared)
           if name not in present and not _is_leftover(name)]
  for name in names:
    files.copy_file(os.path.join(prepared, name), f"{bucket_copy}/{name}")
  if UPLOADED not in present:
    files.write_json(f"{bucket_copy}/{UPLOADED}", dict(files=len(names)))
  if names:
    logging.info("uploaded %d prepared files to %s", len(names), bucket_copy)
