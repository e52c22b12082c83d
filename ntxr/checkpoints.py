"""A run's Orbax checkpoints: workdir/checkpoints/{latest,best}, and unreadable/ for the
ones a rerun could not read.

Each holds a train state and the JSON of the loop's progress. Orbax writes to a
temporary folder and renames it when complete, so a run killed mid-save leaves the
previous checkpoint as the one a rerun restores.
"""

import contextlib
import os
import time
from typing import Optional

from absl import logging
from etils import epath
import orbax.checkpoint as ocp

from ntxr import files, workdir


class UnreadableCheckpoint(workdir.WorkdirError):
  """A checkpoint the run needs cannot be read."""


class CheckpointNotWritten(workdir.WorkdirError):
  """A checkpoint could not be written, most often because the disk is full."""


def _reason(error: BaseException) -> str:
  """The first line of the innermost cause of `error`."""
  while error.__cause__ is not None:
    error = error.__cause__
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


class Checkpoints:
  """Orbax checkpoints in workdir/checkpoints/{latest,best}: a train state and the JSON
  of the loop's progress. latest keeps the checkpoint before it too.

  Orbax writes to a temporary folder and renames it when complete, so a run killed
  mid-save leaves the previous checkpoint as the one a rerun restores. A rerun resumes
  from the newest checkpoint it can read (`resume`); the ones it cannot are moved to
  checkpoints/unreadable/.
  """

  def __init__(self, workdir: str):
    root = os.path.join(workdir if files.is_bucket(workdir) else os.path.abspath(workdir),
                        "checkpoints")
    self.root = root
    # Both save the same step at an epoch's end: under several processes each needs its
    # own names for Orbax's barriers ("latest/15" and "best/15", not "15" twice).
    options = lambda which, kept: ocp.CheckpointManagerOptions(
        max_to_keep=kept, create=True, cleanup_tmp_directories=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=which))
    self.managers = {which: ocp.CheckpointManager(os.path.join(root, which),
                                                  options=options(which, kept))
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


