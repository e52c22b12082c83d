"""What a run keeps in its workdir: config.json, checkpoints, metrics and results.

  config.json              the run's config; a rerun with other settings is refused
  checkpoints/{latest,best} Orbax checkpoints: train state + the loop's progress
  checkpoints/unreadable/  checkpoints a rerun could not read, set aside
  lock                     held by the run using the workdir (host, pid)
  metrics.jsonl            one line per epoch: training, validation, collapse
  tensorboard/             the same as TensorBoard scalars
  results.json             the test metrics and how they were reached
  dcase_{split}.csv        the DCASE submission (each caption's top 10 files)

A workdir is a local folder or a bucket path (gs://...): Orbax and `ntxr.files` write
either. In a bucket there is no lock (buckets have no kernel locks), and TensorBoard's
event files are written locally and uploaded at each flush.
"""

import contextlib
import fcntl
import functools
import json
import logging as std_logging
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
import warnings
from typing import Optional

from absl import logging
from etils import epath
from flax import traverse_util
import jax
import ml_collections
import orbax.checkpoint as ocp

from ntxr import dcase, false_negatives, files, models, objectives, steps
from ntxr.configs import default

# Config fields a resumed run may change (they leave training as it was); any other
# change needs a new workdir.
RESUMABLE_CHANGES = ("num_epochs", "checkpoint_every_steps", "metrics_every_steps",
                     "cache_dir", "stage_dir", "eval_batch_size", "collapse")


# The least value of the numeric fields that have one.
AT_LEAST = dict(batch_size=1, eval_batch_size=1, num_epochs=1, max_steps_per_epoch=0,
                checkpoint_every_steps=1, metrics_every_steps=1, max_tokens=1, embed_dim=1,
                vocab_size=2, margin=0, temperature=1e-6, beta=0, learning_rate=1e-12,
                filter_similarity=0, filter_share_of_positive=0)
MIN_SAMPLE_RATE = 8000  # a 40 ms window of 64 mel bands needs at least this

# How the reported ("best") checkpoint is chosen from each epoch's validation: the
# higher the better.
SELECTIONS = {
    "t2a_mAP@10": lambda validation: validation["t2a"]["mAP@10"],
    "validation_loss": lambda validation: -validation["loss"],  # the authors' choice
}


def run_name(config: ml_collections.ConfigDict) -> str:
  """The run's setting in a word: the strategy for the triplet loss, else the objective."""
  return config.strategy if config.objective == "triplet" else config.objective


class SettingError(ValueError):
  """A setting the user must change before anything runs (usage: exit status 2)."""


def check_config(workdir: str, config: ml_collections.ConfigDict) -> dict:
  """Raises SettingError, writing nothing, for a config that cannot run, a workdir that
  cannot be one, or a config that differs from the run workdir holds; returns the
  config as config.json holds it."""
  if not files.is_bucket(workdir):
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise SettingError(f"--workdir={workdir} is a file, not a folder: give a folder")
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK):
      raise SettingError(f"--workdir={workdir}: cannot write in {existing}")
  if config.require_word_vectors and not config.word_vectors:
    raise SettingError(
        "this config trains on frozen word2vec vectors, as the paper: pass "
        "--config.word_vectors=/path/to/GoogleNews-vectors-negative300.bin (or any "
        "word2vec-format file), or --config.require_word_vectors=false to learn a "
        "random word table instead")
  for field, choices in [("select_by", SELECTIONS), ("train_padding", steps.PADDINGS),
                         ("compute_dtype", models.COMPUTE_DTYPES),
                         ("objective", ("triplet", *objectives.OBJECTIVES)),
                         ("similarity", ("", *false_negatives.SIMILARITIES))]:
    if config[field] not in choices:
      raise SettingError(f"--config.{field} must be one of {sorted(choices)}, not "
                       f"{config[field]!r}")
  for field, least in AT_LEAST.items():
    if config[field] < least:
      raise SettingError(f"--config.{field} must be at least {least}, not {config[field]}")
  if 0 < config.sample_rate < MIN_SAMPLE_RATE:
    raise SettingError(f"--config.sample_rate must be 0 (the corpus's own) or at least "
                     f"{MIN_SAMPLE_RATE} Hz, not {config.sample_rate}")
  for needs, what in [(config.objective == "soft", "--config.objective=soft"),
                      (config.filter_similarity > 0, "--config.filter_similarity")]:
    if needs and not config.similarity:
      raise SettingError(f"{what} compares captions: set --config.similarity to one of "
                       f"{list(false_negatives.SIMILARITIES)}")
  if config.similarity == "word_vectors" and not config.word_vectors:
    raise SettingError("--config.similarity=word_vectors needs --config.word_vectors")
  current = json.loads(config.to_json())
  previous = saved_config(workdir)
  if previous is not None:
    changed = sorted(k for k in set(current) | set(previous)
                     if k not in RESUMABLE_CHANGES and current.get(k) != previous.get(k))
    if changed:
      raise SettingError(f"{workdir} holds a run with other settings ({', '.join(changed)}); "
                       f"use another --workdir")
  return current


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json (the first process) once `check_config` passes. Training calls
  it once its data is read, so a run that fails before leaves no settings behind."""
  current = check_config(workdir, config)
  files.makedirs(workdir)
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, "config.json"), current)


def saved_config(workdir: str) -> Optional[dict]:
  """The config of workdir's run (None if it holds none), with the fields ntxr gained
  since config.json was written at their defaults, so an older run still resumes."""
  path = os.path.join(workdir, "config.json")
  if not files.exists(path):
    return None
  return {**json.loads(default.get_config().to_json()), **json.loads(files.read_text(path))}


class WorkdirError(RuntimeError):
  """A workdir a run cannot go on with; the message says why and what to do."""


class WorkdirInUse(WorkdirError):
  """Another live process runs in this workdir."""


class UnreadableCheckpoint(WorkdirError):
  """A checkpoint the run needs cannot be read."""


class CheckpointNotWritten(WorkdirError):
  """A checkpoint could not be written, most often because the disk is full."""


@contextlib.contextmanager
def held(workdir: str):
  """Holds workdir/lock while a run uses the workdir (the first process of a run).

  A second run on the workdir is refused at once, naming the holder's host and pid. The
  lock is the kernel's (flock), so it ends with its process: one left by a killed run
  blocks nothing. A bucket has no such lock: there a second run is not detected.
  """
  if jax.process_index() != 0:
    yield
    return
  if files.is_bucket(workdir):
    logging.warning("%s is in a bucket, where a run cannot lock its workdir: start one run "
                    "on it at a time", workdir)
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "lock"), "a+") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      lock.seek(0)
      raise WorkdirInUse(f"{workdir} is in use by another run ({lock.read().strip()}); "
                         "wait for it to end or use another --workdir") from None
    lock.truncate(0)
    lock.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
    lock.flush()
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _reason(error: BaseException) -> str:
  """The first line of the innermost cause of `error`."""
  while error.__cause__ is not None:
    error = error.__cause__
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


_CHECKPOINT_ROOTS = set()  # every Checkpoints' root in this process


def _from_orbax(path: str) -> bool:
  return f"{os.sep}orbax{os.sep}" in path


@functools.cache
def _quiet_failed_io() -> None:
  """Keeps a failed read or write of a checkpoint to the one error Checkpoints raises.

  When one array of a checkpoint cannot be read or written, Orbax stops and closes its
  event loop while tensorstore still reads or writes the other arrays. As each ends it
  reports to the closed loop, and its coroutine is collected with the error inside:
  Python would print an "Event loop is closed", "Exception ignored in: <coroutine ...>"
  or "Task (Future, _GatheringFuture) exception was never retrieved" report for each
  array, and "coroutine ... was never awaited" at exit (ntxr has no coroutines of its
  own). Those reports (of Orbax's code, or naming a file under checkpoints) are dropped,
  and Orbax's own error lines keep their message but lose their tracebacks.
  """
  report = sys.unraisablehook

  def hook(unraisable):
    closed_loop = (isinstance(unraisable.exc_value, RuntimeError)
                   and str(unraisable.exc_value) == "Event loop is closed")
    code = getattr(unraisable.object, "cr_code", None)
    if not (closed_loop or (code is not None and _from_orbax(code.co_filename))):
      report(unraisable)
  sys.unraisablehook = hook

  def without_traceback(record):
    if _from_orbax(record.pathname):
      record.exc_info = record.exc_text = None
    return True
  logging.get_absl_logger().addFilter(without_traceback)

  def not_about_checkpoints(record):  # asyncio's "... exception was never retrieved"
    error, message = record.exc_info[1] if record.exc_info else None, record.getMessage()
    frames = traceback.extract_tb(error.__traceback__) if error is not None else []
    return not (_from_orbax(message) or any(_from_orbax(frame.filename) for frame in frames)
                or any(root in message for root in _CHECKPOINT_ROOTS))
  std_logging.getLogger("asyncio").addFilter(not_about_checkpoints)
  warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)


class Checkpoints:
  """Orbax checkpoints in workdir/checkpoints/{latest,best}: a train state and the JSON
  of the loop's progress. latest keeps the checkpoint before it too.

  Orbax writes to a temporary folder and renames it when complete, so a run killed
  mid-save leaves the previous checkpoint as the one a rerun restores. A rerun resumes
  from the newest checkpoint it can read (`resume`); the ones it cannot are moved to
  checkpoints/unreadable/.
  """

  def __init__(self, workdir: str):
    _quiet_failed_io()
    root = os.path.join(workdir if files.is_bucket(workdir) else os.path.abspath(workdir),
                        "checkpoints")
    self.root = root
    _CHECKPOINT_ROOTS.add(root)
    # Both save the same step at an epoch's end: under several processes each needs its
    # own names for Orbax's barriers ("latest/15" and "best/15", not "15" twice).
    self.managers = {
        which: ocp.CheckpointManager(os.path.join(root, which), options=ocp.CheckpointManagerOptions(
            max_to_keep=kept, create=True, cleanup_tmp_directories=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=which)))
        for which, kept in (("latest", 2), ("best", 1))}
    self._saved = {}  # which -> (step, progress) this process saved last

  def step(self, which: str) -> Optional[int]:
    """The step of the `which` ("latest" or "best") checkpoint, or None."""
    return self.managers[which].latest_step()

  def save(self, which: str, state, progress: dict) -> None:
    """Saves (state, progress) as `which`'s checkpoint of the state's step. A checkpoint
    of that step with other progress (saved before validation, say) is replaced."""
    manager = self.managers[which]
    step = int(state.step)
    if self._saved.get(which) == (step, progress):
      return
    with self._writing():  # also reports the previous save, which Orbax waits for
      if step in manager.all_steps():
        manager.wait_until_finished()
        manager.delete(step)
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 progress=ocp.args.JsonSave(progress)))
    self._saved[which] = (step, progress)

  @contextlib.contextmanager
  def _writing(self):
    """Turns a failed write into CheckpointNotWritten, naming the file and the complete
    checkpoints it leaves intact (Orbax removes an old one only once a new one is whole)."""
    try:
      yield
    except Exception as error:  # pylint: disable=broad-except  # tensorstore's, Orbax's, OS's
      folders = [epath.Path(self.root, which) for which in self.managers]
      intact = [f"{folder.name}/{step}" for folder in folders if folder.exists()
                for step in sorted(int(path.name) for path in folder.iterdir()
                                   if path.name.isdigit())]
      raise CheckpointNotWritten(
          f"a checkpoint could not be written in {self.root} ({_reason(error)}); is the disk "
          f"full? The checkpoints before it are intact ({', '.join(intact) or 'none yet'}): "
          "free space and rerun the same command to resume") from error

  def _read(self, which: str, step: int, state=None):
    """(state, progress) of checkpoints/which/step, shaped like `state`; only the progress
    (state None) when `state` is None. Raises UnreadableCheckpoint naming it."""
    items = dict(progress=ocp.args.JsonRestore())
    if state is not None:
      items["state"] = ocp.args.StandardRestore(state)
    try:
      restored = self.managers[which].restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # pylint: disable=broad-except  # tensorstore's, Orbax's, JSON's
      raise UnreadableCheckpoint(f"{self.root}/{which}/{step} cannot be read "
                                 f"({_reason(error)})") from error
    return (restored.state if state is not None else None), restored.progress

  def progress(self, which: str) -> Optional[dict]:
    """The progress saved with the `which` checkpoint, without reading its arrays, or None."""
    step = self.step(which)
    return None if step is None else self._read(which, step)[1]

  def restore(self, which: str, state):
    """(state, progress) of the `which` checkpoint, shaped like `state`, or None."""
    step = self.step(which)
    return None if step is None else self._read(which, step, state)

  def resume(self, state):
    """(state, progress) of the newest checkpoint that can be read: latest, the one before
    it, then best; None if there is none.

    Each one that cannot be read is logged and, once an older one is read, moved to
    checkpoints/unreadable/ (so that a new save of its step is not mistaken for it).
    Raises UnreadableCheckpoint if there are checkpoints and none can be read.
    """
    unreadable = []
    for which in ("latest", "best"):
      for step in sorted(self.managers[which].all_steps(), reverse=True):
        try:
          restored = self._read(which, step, state)
        except UnreadableCheckpoint as error:
          logging.warning("%s", error)
          unreadable.append((which, step, str(error)))
          continue
        if unreadable:
          self._set_aside(unreadable)
          logging.warning("resuming from %s/%s/%d, the newest checkpoint that can be read",
                          self.root, which, step)
        return restored
    if unreadable:
      raise UnreadableCheckpoint(
          "no checkpoint of this run can be read: "
          + "; ".join(reason for _, _, reason in unreadable)
          + f". Remove {self.root} to train again from the start")
    return None

  def _set_aside(self, unreadable: list) -> None:
    aside = epath.Path(self.root, "unreadable")
    aside.mkdir(parents=True, exist_ok=True)
    for which, step, _ in unreadable:
      epath.Path(self.root, which, str(step)).rename(
          aside / f"{which}_{step}_{time.strftime('%Y%m%d-%H%M%S')}")
    for manager in self.managers.values():
      manager.reload()

  def wait(self) -> None:
    with self._writing():
      for manager in self.managers.values():
        manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the saves in flight, then closes; a failed one raises CheckpointNotWritten."""
    try:
      self.wait()
    finally:
      for manager in self.managers.values():
        manager.close()

  def __enter__(self) -> "Checkpoints":
    return self

  def __exit__(self, kind, error, trace) -> None:
    try:
      self.close()
    except CheckpointNotWritten as late:
      if error is None:
        raise
      logging.info("%s", late)  # the error already on its way says what matters


FALSE_NEGATIVE_SHARES = ("false_negative_share", "filtered_share", "filtered_false_share")


def false_negatives_of(records: list, epoch: int) -> Optional[dict]:
  """The training false-negative shares logged for `epoch`, or None if not measured."""
  for record in records:
    if record["epoch"] == epoch and FALSE_NEGATIVE_SHARES[0] in record["training"]:
      return {name: record["training"][name] for name in FALSE_NEGATIVE_SHARES}
  return None


class MetricsLog:
  """metrics.jsonl (one line per epoch) and TensorBoard scalars in workdir, written by
  the first process only. For a bucket workdir the event files are written in a local
  folder and uploaded to workdir/tensorboard at each flush (closing removes the folder)."""

  def __init__(self, workdir: str, completed_epochs: int):
    self.chief = jax.process_index() == 0
    if not self.chief:
      return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self.path = os.path.join(workdir, "metrics.jsonl")
    if files.exists(self.path):  # drop epochs a resumed run will redo
      kept = [r for r in files.read_jsonl(self.path) if r["epoch"] <= completed_epochs]
      files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
    self.tensorboard_dir = os.path.join(workdir, "tensorboard")
    self.staged = (tempfile.mkdtemp(prefix="ntxr-tensorboard-") if files.is_bucket(workdir)
                   else None)
    self.summary = tf.summary  # TensorFlow is imported only where a run logs
    self.tensorboard = self.summary.create_file_writer(self.staged or self.tensorboard_dir)

  def write(self, step: int, record: dict) -> None:
    if not self.chief:
      return
    files.append_line(self.path, json.dumps(record))
    with self.tensorboard.as_default(step=step):
      for name, value in traverse_util.flatten_dict(record, sep="/").items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          self.summary.scalar(name, value)
    self.tensorboard.flush()
    if self.staged:
      for name in os.listdir(self.staged):
        files.write_bytes(os.path.join(self.tensorboard_dir, name),
                          files.read_bytes(os.path.join(self.staged, name)))

  def __enter__(self) -> "MetricsLog":
    return self

  def __exit__(self, *error) -> None:
    if self.chief:
      self.tensorboard.close()
      if self.staged:
        shutil.rmtree(self.staged, ignore_errors=True)


def write_results(workdir: str, results: dict, submission: Optional[dcase.Submission]) -> None:
  """results.json, and the split's DCASE submission if it has enough clips for one;
  written by the first process only."""
  if jax.process_index() != 0:
    return
  split = results["split"]
  if submission is None:
    logging.warning("%s has fewer clips than a DCASE submission's %d: none written",
                    split, dcase.TOP)
  else:
    dcase.write_submission(os.path.join(workdir, f"dcase_{split}.csv"), *submission)
  files.write_json(os.path.join(workdir, "results.json"), results)
