"""What people judged relevant: DCASE 2025's several matching clips per query, and the
TAU Audio-Text Graded Relevances' 0-100 ratings; each read with errors that name the file
and line, and each scored against a ranking of files per query.

  relevant = read_dcase2025("metadata_eval.csv")       # {query: (file names)}
  tau = read_tau("tau_relevances", "evaluation")        # TauSplit
  multi_relevance_metrics(relevant, ranked)             # {"mAP@16", ..., "queries"}
  graded_metrics(tau.ratings, ranked)                   # {"nDCG@10", "nDCG@16", "queries"}

`ranked` maps each query to its files best first: a whole ranking, or a top-k list
(what lies beyond it counts as not retrieved).
"""

import ast
import dataclasses
import os

import numpy as np

from ntxr import files, ranking

DCASE2025_FILE = "metadata_eval.csv"  # its name in the challenge's baseline, and beside
# a data folder's captions, where runs find it
DCASE2025_COLUMNS = ["query", "audio_filenames"]
TAU_GROUPS = ("TP", "TN", "C15")  # the query's own clip, a random one, 15 candidates
RELEVANT_RATING = 50  # "rated at least 50": the share of people's scale that matches


def _rows(path: str, header: list) -> list:
  """[(line, fields)] after a header that must equal `header`; each row as long."""
  records = files.read_csv(path)
  if not records or records[0][1][:len(header)] != header:
    raise ValueError(f"{path}:1: expected the header {','.join(header)}")
  width = len(records[0][1])
  for line, row in records[1:]:
    if len(row) != width:
      raise ValueError(f"{path}:{line}: expected {width} fields, got {len(row)}")
  return records[1:]


def _file_list(path: str, line: int, text: str) -> tuple:
  """A Python list string of file names -> tuple; ValueError naming the line."""
  try:
    names = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    names = None
  if (not isinstance(names, list) or not names
      or not all(isinstance(n, str) and n for n in names)):
    raise ValueError(f"{path}:{line}: expected a Python list of file names, got "
                     f"{text[:60]!r}")
  if len(set(names)) != len(names):
    raise ValueError(f"{path}:{line}: a file is listed twice in {text[:60]!r}")
  return tuple(names)


def read_dcase2025(path: str) -> dict:
  """The challenge's `query,audio_filenames` file -> {query: (relevant file names)}."""
  relevant, first = {}, {}
  for line, (query, names) in _rows(path, DCASE2025_COLUMNS):
    if not query.strip():
      raise ValueError(f"{path}:{line}: the query is empty")
    if query in relevant:
      raise ValueError(f"{path}:{line}: query {query[:60]!r} is given twice (first at line "
                       f"{first[query]})")
    relevant[query], first[query] = _file_list(path, line, names), line
  return relevant


def write_dcase2025(path: str, relevant: dict) -> None:
  """Writes {query: file names} in the challenge's format (atomic)."""
  files.write_csv(path, DCASE2025_COLUMNS,
                  ([query, str(list(names))] for query, names in relevant.items()))


@dataclasses.dataclass(frozen=True)
class TauSplit:
  """One split of the TAU ratings, by text and file name.

  ratings: {query text: {file name: rating 0-100}} of the 200 rated queries (17 clips
  each); groups: {query text: {file name: "TP", "TN" or "C15"}}; captions: {file name:
  [its captions]} of every clip of the split.
  """
  ratings: dict
  groups: dict
  captions: dict


def tau_splits(folder: str) -> list:
  """The splits whose ratings `folder` holds (SPLIT_relevances.csv), sorted."""
  suffix = "_relevances.csv"
  return sorted(name[:-len(suffix)] for name in (
      os.listdir(folder) if os.path.isdir(folder) else []) if name.endswith(suffix))


def read_tau(folder: str, split: str) -> TauSplit:
  """A split's `_relevances.csv`, `_text.csv` and `_audio_metadata.csv` from `folder`."""
  path = lambda kind: os.path.join(folder, f"{split}_{kind}.csv")
  names = {}
  for line, row in _rows(path("audio_metadata"), ["split", "fid", "file_name"]):
    if not row[2]:
      raise ValueError(f"{path('audio_metadata')}:{line}: the file name is empty")
    names[row[1]] = row[2]
  texts, captions = {}, {name: [] for name in names.values()}
  for line, row in _rows(path("text"), ["split", "tid", "fid", "text"]):
    if row[2] not in names:
      raise ValueError(f"{path('text')}:{line}: clip {row[2]!r} is not in "
                       f"{path('audio_metadata')}")
    texts[row[1]] = row[3]
    captions[names[row[2]]].append(row[3])
  ratings, groups = {}, {}
  for line, (tid, fid, group, rating) in _rows(path("relevances"),
                                               ["tid", "fid", "fid_group", "rating"]):
    if tid not in texts or fid not in names:
      unknown, where = (f"query {tid!r}", "text") if tid not in texts else (
          f"clip {fid!r}", "audio_metadata")
      raise ValueError(f"{path('relevances')}:{line}: {unknown} is not in {path(where)}")
    if group not in TAU_GROUPS:
      raise ValueError(f"{path('relevances')}:{line}: group {group!r} is not one of "
                       f"{list(TAU_GROUPS)}")
    try:
      value = float(rating)
    except ValueError:
      value = float("nan")
    if not 0 <= value <= 100:
      raise ValueError(f"{path('relevances')}:{line}: rating {rating!r} is not 0 to 100")
    query, name = texts[tid], names[fid]
    if name in ratings.get(query, {}):
      raise ValueError(f"{path('relevances')}:{line}: clip {name!r} is rated twice for "
                       f"query {query[:60]!r}")
    ratings.setdefault(query, {})[name] = value
    groups.setdefault(query, {})[name] = group
  return TauSplit(ratings, groups, captions)


def _check_ranked(relevant: dict, ranked: dict) -> None:
  missing = [q for q in relevant if q not in ranked]
  if missing:
    raise ValueError(f"{len(missing)} judged queries have no ranking, e.g. "
                     f"{missing[0][:60]!r}")


def multi_relevance_metrics(relevant: dict, ranked: dict) -> dict:
  """DCASE 2025's metrics (`ranking.MULTI`, AP@k as its baseline defines it) over the
  judged queries, and "queries": their number.

  Args:
    relevant: {query: relevant file names} (`read_dcase2025`).
    ranked: {query: file names best first} for every judged query (more are ignored).
  """
  _check_ranked(relevant, ranked)
  length = max(len(ranked[q]) for q in relevant)
  hits = np.zeros((len(relevant), length), bool)
  for row, (query, names) in enumerate(relevant.items()):
    wanted = set(names)
    hits[row, :len(ranked[query])] = [name in wanted for name in ranked[query]]
  metrics = ranking.ranked_metrics(hits, [len(set(n)) for n in relevant.values()],
                                    ap_at=(16, 10), full=False, divide_by_all_relevant=True)
  return dict({k: metrics[k] for k in ranking.MULTI}, queries=len(relevant))


def graded_metrics(ratings: dict, ranked: dict, ks=ranking.NDCG_KS) -> dict:
  """nDCG@k against people's ratings (gain rating / 100; unrated files gain 0; the
  ideal ranks the query's rated files by rating) over the rated queries, and "queries":
  how many were scored (a query whose ratings are all 0 has no ideal and is left out).

  Args:
    ratings: {query: {file name: rating 0-100}} (`TauSplit.ratings`).
    ranked: {query: file names best first} for every rated query (more are ignored).
  """
  _check_ranked(ratings, ranked)
  length = max(len(ranked[q]) for q in ratings)
  gains = np.zeros((len(ratings), length))
  ideal = np.zeros((len(ratings), max(len(r) for r in ratings.values())))
  for row, (query, rated) in enumerate(ratings.items()):
    gains[row, :len(ranked[query])] = [rated.get(n, 0.0) / 100 for n in ranked[query]]
    ideal[row, :len(rated)] = np.array(list(rated.values())) / 100
  return ranking.ranked_ndcg(gains, ideal, ks)


def first_rows(texts: list) -> dict:
  """{text: the index of its first row}, in first-row order: a caption given by more
  than one row (two clips, or one clip twice, may share a caption) counts once.

  >>> first_rows(["rain", "a dog", "rain"])
  {'rain': 0, 'a dog': 1}
  """
  first = {}
  for row, text in enumerate(texts):
    first.setdefault(text, row)
  return first


def ranked_by_score(queries: list, file_names: list, s: np.ndarray) -> dict:
  """{query: every file name best first} from scores s [queries, files] (ties: the
  lower index first); a query given twice keeps its first row."""
  first = first_rows(queries)
  order = ranking.rank_order(np.asarray(s)[list(first.values())])
  return {query: [file_names[j] for j in row] for query, row in zip(first, order)}
