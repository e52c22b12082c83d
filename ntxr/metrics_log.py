"""A run's metrics log: workdir/metrics.jsonl (one line per epoch: training, validation,
collapse) and the same as TensorBoard scalars in workdir/tensorboard/."""

import json
import os
import shutil
import tempfile
from typing import Optional

from flax import traverse_util
import jax

from ntxr import files


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
    self.staged = None
    if files.is_bucket(workdir):  # staged here; killed runs' stagings (uploaded) removed
      staging = os.path.join(tempfile.gettempdir(), "ntxr-tensorboard")
      files.remove_left_by_dead(staging)
      prefix = os.path.basename(files.partial_path(staging)) + "-"
      self.staged = tempfile.mkdtemp(prefix=prefix)
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
