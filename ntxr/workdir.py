"""What a run keeps in its workdir; this module holds its lock and writes its results.

  config.json              the run's config; a rerun with other settings is refused
                           (ntxr.settings)
  checkpoints/{latest,best} Orbax checkpoints: train state + the loop's progress
  checkpoints/unreadable/  checkpoints a rerun could not read, set aside (ntxr.checkpoints)
  lock                     held by the run using the workdir (host, pid)
  metrics.jsonl            one line per epoch: training, validation, collapse
  tensorboard/             the same as TensorBoard scalars (ntxr.metrics_log)
  results.json             the test metrics, how they were reached, and the date,
                           commit and package versions of the process that wrote it
  dcase_{split}.csv        the DCASE submission (each caption's top 10 files)
  dcase2025_{split}.csv    with a relevance file: the judged captions' scores for every
                           file, as the DCASE 2025 baseline writes them

A workdir is a local folder or a bucket path (gs://...): Orbax and `ntxr.files` write
either. In a bucket there is no lock (buckets have no kernel locks), and TensorBoard's
event files are written locally and uploaded at each flush.
"""

import contextlib
import os
import socket
from typing import Optional

from absl import logging
from etils import epath
import jax

from ntxr import dcase, files, settings


class WorkdirError(RuntimeError):
  """A workdir a run cannot go on with; the message says why and what to do."""


class WorkdirInUse(WorkdirError):
  """Another live process runs in this workdir."""


@contextlib.contextmanager
def in_use(workdir: str):
  """Marks workdir as in use by this run (the first process of a run): workdir/lock.

  A second run on the workdir is refused at once, naming the holder's host and pid. The
  lock ends with its process (`files.locked`): one left by a killed run blocks nothing.
  A bucket has no such lock: there a second run is not detected.
  """
  if jax.process_index() != 0:
    yield
    return
  if files.is_bucket(workdir):
    logging.warning("%s is in a bucket, where a run cannot lock its workdir: start one run "
                    "on it at a time", workdir)
    yield
    return
  try:
    with files.locked(os.path.join(workdir, "lock"), wait=False,
                      holder=f"host {socket.gethostname()}, pid {os.getpid()}"):
      yield
  except files.Locked as holder:
    raise WorkdirInUse(f"{workdir} is in use by another run ({holder}); wait for it to end "
                       "or use another --workdir") from None


def check_trained(workdir: str) -> None:
  """Raises settings.SettingError, writing nothing, unless workdir holds a run with a best
  checkpoint to test (what --eval_only tests)."""
  if settings.saved(workdir) is None:
    raise settings.SettingError(f"--workdir={workdir} holds no trained run (no config.json): "
                                "--eval_only tests one; give its workdir")
  best = epath.Path(workdir, "checkpoints", "best")
  if not (best.is_dir() and any(path.name.isdigit() for path in best.iterdir())):
    raise settings.SettingError(f"--workdir={workdir} holds no best checkpoint yet (one is "
                                "saved at each epoch's end): train it first, without "
                                "--eval_only")


def write_results(workdir: str, results: dict, submission: Optional[dcase.Submission],
                  score_matrix: Optional[dcase.Submission] = None) -> None:
  """results.json, the split's DCASE submission if it has enough clips for one, and its
  DCASE 2025 score matrix if given; written by the first process only."""
  if jax.process_index() != 0:
    return
  split = results["split"]
  if score_matrix is not None:
    dcase.write_score_matrix(os.path.join(workdir, f"dcase2025_{split}.csv"), *score_matrix)
  if submission is None:
    logging.warning("%s has fewer clips than a DCASE submission's %d: none written",
                    split, dcase.RANKED)
  else:
    dcase.write_submission(os.path.join(workdir, f"dcase_{split}.csv"), *submission)
  files.write_json(os.path.join(workdir, "results.json"), results)
