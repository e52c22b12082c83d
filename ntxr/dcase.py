"""DCASE language-based audio retrieval submissions: write one, score one.

  python -m ntxr.dcase --ground_truth=clotho_captions_evaluation.csv \\
      --predictions=submission.csv [--output_json=scores.json]          # 2022-2024
  python -m ntxr.dcase --relevance=metadata_eval.csv --predictions=scores.csv \\
      [--ground_truth=clotho_captions_evaluation.csv] [--output_json=scores.json]  # 2025
  python -m ntxr.dcase --graded_relevance=tau_relevances --split=evaluation \\
      --predictions=scores.csv [--output_json=scores.json]              # people's ratings

A submission holds `caption,file_name_1..file_name_10`, one row per caption, best
first (2022-2024), or a score matrix as the 2025 baseline writes it: a header naming
the query column and then one column per audio file, one row of scores per query.
Scoring follows each challenge's script. 2022: each distinct caption text of the
ground truth has one relevant file (the last row naming that text, as the script's
dictionary keeps it); R@k says whether that file is in the top k and mAP@10 is
1/rank within the top 10, each averaged over captions. 2025: several relevant files
per query (`ntxr.relevance.multi_relevance_metrics`, ranked by mAP@16). Graded: nDCG
against the TAU ratings (`ntxr.relevance.graded_metrics`). A top-10 list ranks nothing
beyond its tenth file, so its metrics at a cut-off beyond 10 (mAP@16, nDCG@16) are lower
bounds, printed as such and listed in the JSON's `lower_bounds`. A score matrix that leaves
out some of the files it could score is warned about: those are never retrieved, at any
cut-off, however few files it scores.
"""

import os
from typing import NamedTuple

from ntxr import ctrl_c

if __name__ == "__main__":  # first: a Ctrl-C while the imports below load costs one line
  ctrl_c.exit_at_once(ctrl_c.AGAIN)

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
from absl import logging
import numpy as np

from ntxr import command, files, relevance as relevance_lib
# pylint: enable=wrong-import-position

RANKED = 10  # files a submission lists per caption, best first
BOUND_NOTE = "a lower bound: a top-10 list ranks no file beyond its tenth"
COLUMNS = ["caption"] + [f"file_name_{k}" for k in range(1, RANKED + 1)]

FLAGS = flags.FLAGS


class Submission(NamedTuple):
  """What a submission ranks: captions [Q], file_names [C], scores [Q, C]."""
  captions: list
  file_names: list
  scores: np.ndarray


class UnknownName(ValueError):
  """A submission names a caption, query or file its ground truth does not know."""


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


def read_predictions(path: str, relevant: dict, known_files: set,
                     known_captions=None) -> dict:
  """A submission -> {caption: ten file names}, checked against the ground truth
  (`relevant`'s captions, or `known_captions` when given): a caption given twice is
  refused, never resolved by row order."""
  known_captions = relevant if known_captions is None else known_captions
  header, rows = _header_and_rows(path)
  if header != COLUMNS:
    raise ValueError(f"{path}:1: expected the header {','.join(COLUMNS)}")
  ranked, first_line = {}, {}
  for line, row in rows:
    if len(row) != RANKED + 1 or not all(row):
      raise ValueError(f"{path}:{line}: expected a caption and {RANKED} file names, "
                       f"got {len([r for r in row[1:] if r])} names")
    caption, names = row[0], row[1:]
    if caption not in known_captions:
      raise UnknownName(f"{path}:{line}: unknown caption {caption[:60]!r}")
    if caption in ranked:
      raise ValueError(f"{path}:{line}: caption {caption[:60]!r} is given twice (first at "
                       f"line {first_line[caption]}); give each caption one row")
    unknown = [n for n in names if n not in known_files]
    if unknown:
      raise UnknownName(f"{path}:{line}: unknown file {unknown[0]!r}")
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


def read_score_matrix(path: str, known_queries, known_files: set, whose: str) -> dict:
  """A 2025 score matrix -> {query: every file name best first (ties: the column
  order)}; queries and files must be known, each once, and every score finite. A warning
  names the known files it leaves out (`whose` they are: "the split's", say)."""
  header, rows = _header_and_rows(path)
  if not header or len(header) < 2:
    raise ValueError(f"{path}:1: expected a header: the query column, then one column "
                     f"per audio file")
  names, seen = header[1:], set()
  for name in names:
    if name not in known_files:
      raise UnknownName(f"{path}:1: unknown file {name!r}")
    if name in seen:
      raise ValueError(f"{path}:1: file {name!r} has two columns")
    seen.add(name)
  queries, first, values = [], {}, np.zeros((len(rows), len(names)))
  for row, (line, fields) in enumerate(rows):
    query = fields[0]
    if len(fields) != len(header):
      raise ValueError(f"{path}:{line}: expected a query and {len(names)} scores, got "
                       f"{len(fields) - 1}")
    if query not in known_queries:
      raise UnknownName(f"{path}:{line}: unknown query {query[:60]!r}")
    if query in first:
      raise ValueError(f"{path}:{line}: query {query[:60]!r} is given twice (first at "
                       f"line {first[query]})")
    try:
      values[row] = [float(x) for x in fields[1:]]
    except ValueError:
      values[row] = np.nan
    if not np.isfinite(values[row]).all():
      raise ValueError(f"{path}:{line}: every score must be a finite number")
    queries.append(query)
    first[query] = line
  unscored = sorted(known_files - seen)
  if unscored:
    logging.warning("%s scores %d of %s %d files: the other %d (%s) count as never "
                    "retrieved", path, len(seen), whose, len(known_files),
                    len(unscored), ", ".join(unscored[:3]) + (", ..." if len(unscored) > 3
                                                              else ""))
  return relevance_lib.ranked_by_score(queries, names, values)


def is_top_list(path: str) -> bool:
  """Whether a submission is a top-10 list (by its header), not a score matrix."""
  return _header_and_rows(path)[0] == COLUMNS


def read_ranked(path: str, known_queries, known_files: set, whose: str) -> dict:
  """{query: file names best first} from a top-10 list or a score matrix (told apart by
  the header), checked against the known queries and files (`whose` they are)."""
  if is_top_list(path):
    return read_predictions(path, {}, known_files, known_captions=known_queries)
  return read_score_matrix(path, known_queries, known_files, whose)


def lower_bounds(path: str, result: dict) -> set:
  """The metrics of `result`, scores of the submission at `path`, that only bound the
  value from below: for a top-10 list, those at a cut-off beyond its tenth file, which
  the files it does not rank could raise."""
  if not is_top_list(path):
    return set()
  return {name for name in result
          if "@" in name and int(name.rsplit("@", 1)[1]) > RANKED}


def score_2025(relevance_file: str, predictions: str, ground_truth=None) -> dict:
  """DCASE 2025's scores of a submission against `relevance_file`. The queries and
  files a submission may name are the relevance file's and, given `ground_truth` (the
  split's Clotho captions CSV), every caption and file of the split; the relevance
  file's queries are scored."""
  relevant = relevance_lib.read_dcase2025(relevance_file)
  known_queries = set(relevant)
  known_files = {name for names in relevant.values() for name in names}
  if ground_truth:
    captions, names = read_ground_truth(ground_truth)
    known_queries, known_files = known_queries | set(captions), known_files | names
  try:
    ranked = read_ranked(predictions, known_queries, known_files,
                         "the split's" if ground_truth else "the relevance file's")
  except UnknownName as error:
    if ground_truth:
      raise
    raise UnknownName(f"{error}: not in {relevance_file} (--ground_truth, the split's "
                      "captions file, adds every caption and file of the split)") from None
  return relevance_lib.multi_relevance_metrics(relevant, ranked)


def score_graded(folder: str, split: str, predictions: str) -> dict:
  """nDCG of a submission against the TAU ratings of `split` in `folder`: the queries
  known are every caption of the split, those scored the rated ones."""
  tau = relevance_lib.read_tau(folder, split)
  known = {caption for captions in tau.captions.values() for caption in captions}
  ranked = read_ranked(predictions, known, set(tau.captions), "the split's")
  return relevance_lib.graded_metrics(tau.ratings, ranked)


def write_score_matrix(path: str, queries: list, file_names: list, s: np.ndarray) -> None:
  """Writes s [queries, files] as the 2025 baseline's score matrix (atomic), each score
  with the 9 digits that give a float32 back exactly; a query given more than once gets
  one row, its first's."""
  files.write_csv(path, ["query", *file_names],
                  ([query, *(f"{x:.9g}" for x in s[row])]
                   for query, row in relevance_lib.first_rows(queries).items()))


def write_submission(path: str, captions: list, file_names: list, s: np.ndarray) -> None:
  """Writes each caption's top 10 files by s [captions, files], best first (atomic). A
  caption text given more than once (two clips, or one clip twice, may share a caption)
  gets one row, its first's: a submission ranks each text once, and a text's ranking does
  not depend on which clip it came with."""
  order = np.argsort(-np.asarray(s), axis=1, kind="stable")[:, :RANKED]
  first = relevance_lib.first_rows(captions)
  files.write_csv(path, COLUMNS, ([caption, *(file_names[j] for j in order[row])]
                                  for caption, row in first.items()))


def define_flags() -> None:
  """This command's flags (defined where it starts, not when ntxr.dcase is imported)."""
  flags.DEFINE_string("ground_truth", None, "Clotho captions CSV (2022-2024; with "
                      "--relevance, it adds the split's files)")
  flags.DEFINE_string("relevance", None, "DCASE 2025 metadata_eval.csv: several relevant "
                      "files per query")
  flags.DEFINE_string("graded_relevance", None, "a folder of the TAU graded relevances "
                      "(SPLIT_relevances.csv, SPLIT_text.csv, SPLIT_audio_metadata.csv)")
  flags.DEFINE_string("split", "evaluation", "the split of --graded_relevance")
  flags.DEFINE_string("predictions", None, "submission CSV to score: a top-10 list or a "
                      "score matrix")
  flags.DEFINE_string("output_json", None, "also write the scores here as JSON")


def main(argv):
  command.start(argv)
  if not FLAGS.predictions or not (FLAGS.ground_truth or FLAGS.relevance
                                   or FLAGS.graded_relevance):
    command.exit_with("give --predictions and what to score it against: --ground_truth "
                      "(2022-2024), --relevance (2025) or --graded_relevance", 2)
  if FLAGS.relevance and FLAGS.graded_relevance:
    command.exit_with("--relevance and --graded_relevance score apart: give one", 2)
  output = FLAGS.output_json
  try:
    if output:
      files.check_output("output_json", output, {
          flag: FLAGS[flag].value for flag in ("predictions", "ground_truth", "relevance")},
          data_dir=FLAGS.graded_relevance)
  except ValueError as error:
    command.exit_with(error, 2)
  if FLAGS.graded_relevance and not os.path.isdir(FLAGS.graded_relevance):
    command.exit_with(f"--graded_relevance={FLAGS.graded_relevance}: no such folder", 2)
  try:
    if FLAGS.graded_relevance:
      result = score_graded(FLAGS.graded_relevance, FLAGS.split, FLAGS.predictions)
    elif FLAGS.relevance:
      result = score_2025(FLAGS.relevance, FLAGS.predictions, FLAGS.ground_truth)
    else:
      result = score_files(FLAGS.ground_truth, FLAGS.predictions)
  except (FileNotFoundError, ValueError) as error:
    command.exit_with(error, 1)
  bounded = lower_bounds(FLAGS.predictions, result)
  print("  ".join((f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}")
                  + (f" ({BOUND_NOTE})" if k in bounded else "") for k, v in result.items()))
  if output:
    files.write_json(output, dict(result, lower_bounds=sorted(bounded)) if bounded else result)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=command.parse_flags)
