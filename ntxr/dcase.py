"""DCASE language-based audio retrieval submissions: write one, score one.

  python -m ntxr.dcase --ground_truth=clotho_captions_evaluation.csv \\
      --predictions=submission.csv [--output_json=scores.json]

A submission holds `caption,file_name_1..file_name_10`, one row per caption, best
first. Scoring follows the challenge's script: each distinct caption text of the
ground truth has one relevant file (the last row naming that text, as the script's
dictionary keeps it); R@k says whether that file is in the top k and mAP@10 is
1/rank within the top 10, each averaged over captions.
"""

import csv
import io
import os
from typing import NamedTuple

from absl import app
from absl import flags
import numpy as np

from ntxr import command, files

RANKED = 10  # files a submission lists per caption, best first

FLAGS = flags.FLAGS


class Submission(NamedTuple):
  """What a submission ranks: captions [Q], file_names [C], scores [Q, C]."""
  captions: list
  file_names: list
  scores: np.ndarray
COLUMNS = ["caption"] + [f"file_name_{k}" for k in range(1, RANKED + 1)]


def _header_and_rows(path: str) -> tuple:
  """(header or None, [(line, fields)] after it) of a UTF-8 CSV; errors name the file."""
  records = files.read_csv(path)
  return (records[0][1], records[1:]) if records else (None, [])


def read_ground_truth(path: str) -> tuple:
  """Clotho `file_name,caption_1..caption_5` -> ({caption: file_name}, file names)."""
  header, rows = _header_and_rows(path)
  if not header or header[0] != "file_name" or len(header) < 2:
    raise ValueError(f"{path}:1: expected a header file_name,caption_1,..., got {header}")
  relevant, names = {}, set()
  for line, row in rows:
    if len(row) != len(header) or not row[0] or not all(row[1:]):
      raise ValueError(f"{path}:{line}: expected a file name and {len(header) - 1} "
                       f"non-empty captions")
    names.add(row[0])
    relevant.update((caption, row[0]) for caption in row[1:])
  return relevant, names


def read_predictions(path: str, relevant: dict, known_files: set) -> dict:
  """A submission -> {caption: ten file names}, checked against the ground truth: a
  caption given twice is refused, never resolved by row order."""
  header, rows = _header_and_rows(path)
  if header != COLUMNS:
    raise ValueError(f"{path}:1: expected the header {','.join(COLUMNS)}")
  ranked, first_line = {}, {}
  for line, row in rows:
    if len(row) != RANKED + 1 or not all(row):
      raise ValueError(f"{path}:{line}: expected a caption and {RANKED} file names, "
                       f"got {len([r for r in row[1:] if r])} names")
    caption, names = row[0], row[1:]
    if caption not in relevant:
      raise ValueError(f"{path}:{line}: caption {caption[:60]!r} is not in the ground truth")
    if caption in ranked:
      raise ValueError(f"{path}:{line}: caption {caption[:60]!r} is given twice (first at "
                       f"line {first_line[caption]}); give each caption one row")
    unknown = [n for n in names if n not in known_files]
    if unknown:
      raise ValueError(f"{path}:{line}: unknown file {unknown[0]!r}")
    ranked[caption], first_line[caption] = names, line
  missing = [c for c in relevant if c not in ranked]
  if missing:
    raise ValueError(f"{path}: {len(missing)} ground-truth captions have no row, "
                     f"e.g. {missing[0][:60]!r}")
  return ranked


def score(relevant: dict, ranked: dict) -> dict:
  """{"R@1", "R@5", "R@10", "mAP@10"} averaged over the ground truth's captions."""
  ranks = np.array([ranked[c].index(f) + 1 if f in ranked[c] else RANKED + 1
                    for c, f in relevant.items()])
  result = {f"R@{k}": float(np.mean(ranks <= k)) for k in (1, 5, RANKED)}
  result["mAP@10"] = float(np.mean(np.where(ranks <= RANKED, 1.0 / ranks, 0.0)))
  return result


def score_files(ground_truth: str, predictions: str) -> dict:
  relevant, known_files = read_ground_truth(ground_truth)
  return score(relevant, read_predictions(predictions, relevant, known_files))


def write_submission(path: str, captions: list, file_names: list, s: np.ndarray) -> None:
  """Writes each caption's top 10 files by s [captions, files], best first (atomic). A
  caption text given more than once (two clips, or one clip twice, may share a caption)
  gets one row, its first's: a submission ranks each text once, and a text's ranking does
  not depend on which clip it came with."""
  order = np.argsort(-np.asarray(s), axis=1, kind="stable")[:, :RANKED]
  first = {}
  for row, caption in enumerate(captions):
    first.setdefault(caption, row)
  text = io.StringIO(newline="")
  writer = csv.writer(text)
  writer.writerow(COLUMNS)
  writer.writerows([caption, *(file_names[j] for j in order[row])]
                   for caption, row in first.items())
  files.write_text(path, text.getvalue())


def define_flags() -> None:
  """This command's flags (defined where it starts, not when ntxr.dcase is imported)."""
  flags.DEFINE_string("ground_truth", None, "Clotho captions CSV")
  flags.DEFINE_string("predictions", None, "submission CSV to score")
  flags.DEFINE_string("output_json", None, "also write the four scores here as JSON")


def main(argv):
  command.start(argv)
  if not (FLAGS.ground_truth and FLAGS.predictions):
    raise app.UsageError("--ground_truth and --predictions are required")
  output = FLAGS.output_json
  folder = os.path.dirname(os.path.abspath(output or "."))
  if output and not files.is_bucket(output) and not os.path.isdir(folder):
    command.exit_with(f"--output_json: no folder {folder}", 2)
  try:
    result = score_files(FLAGS.ground_truth, FLAGS.predictions)
  except (FileNotFoundError, ValueError) as error:
    command.exit_with(error, 1)
  print("  ".join(f"{k} {v:.4f}" for k, v in result.items()))
  if output:
    files.write_json(output, result)


if __name__ == "__main__":
  define_flags()
  app.run(main)
