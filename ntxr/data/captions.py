"""Caption files (Clotho v2, AudioCaps, your own pairs) and the captions' text cleaning.

Bad rows raise ValueError naming the file and line, or, with skip=True, are left out
and reported in the returned `skipped` list as (line, reason). Files may start with a
UTF-8 byte-order mark, as spreadsheet programs save "CSV UTF-8".
"""

import dataclasses
import os
import re

import numpy as np

from ntxr import files, layouts

# Clotho v2's layout: one folder holding clotho_captions_{split}.csv (CLOTHO_COLUMNS) and
# a folder of audio per split. The built-in corpus is written in it (`write_clotho_captions`).
CAPTIONS_PER_CLIP = 5
CLOTHO_COLUMNS = ["file_name"] + [f"caption_{k}" for k in range(1, CAPTIONS_PER_CLIP + 1)]
AUDIOCAPS_COLUMNS = ["audiocap_id", "youtube_id", "start_time", "caption"]
PAIRS_COLUMNS = ["file_name", "caption"]  # and optionally "split"
SPLIT_NAMES = {"development": "development", "train": "development",
               "training": "development", "validation": "validation", "val": "validation",
               "valid": "validation", "evaluation": "evaluation", "test": "evaluation"}
SPLIT_SEED = 0  # the seeded split of a captions.csv without a split column
SPLIT_SHARES = {"validation": 0.15, "evaluation": 0.15}  # the rest is development


@dataclasses.dataclass(frozen=True)
class Clip:
  """A clip and its captions, with the CSV line it came from."""
  file_name: str
  captions: tuple
  line: int


def clean_text(text: str) -> str:
  """ntxr's cleaning: lower case, every punctuation mark (hyphens too) to a space.

  >>> clean_text("A dog's walkie-talkie, then... SILENCE!")
  'a dog s walkie talkie then silence'
  """
  return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def clean_text_paper(text: str) -> str:
  """The authors' cleaning (their `text_cleaning.py`): lower case, ASCII punctuation but
  the hyphen to spaces, split on white space. (Their named-entity step, NLTK's NE chunker,
  needs a model download and is not reproduced.)

  >>> clean_text_paper("A dog's walkie-talkie, then... SILENCE!")
  'a dog s walkie-talkie then silence'
  """
  return " ".join(re.sub(r"""[!"#$%&'()*+,./\\:;<=>?@\[\]^_`{|}~]""", " ", text.lower()).split())


TEXT_CLEANING = {"ntxr": clean_text, "paper": clean_text_paper}  # layouts.TEXT_CLEANINGS


def _rows(path: str, columns: list) -> list:
  """[(line number, {column: value or None})] of a UTF-8 CSV whose header holds `columns`."""
  try:
    records = files.read_csv(path)
  except FileNotFoundError as e:
    raise ValueError(f"{path}: caption file not found") from e
  header = records[0][1] if records else []
  missing = [c for c in columns if c not in header]
  if missing:
    raise ValueError(f"{path}:1: missing columns {missing}; expected {columns}")
  return [(line, {name: fields[i] if i < len(fields) else None
                  for i, name in enumerate(header)}) for line, fields in records[1:]]


def _keep_or_raise(path, line, reason, skip, skipped):
  if not skip:
    raise ValueError(f"{path}:{line}: {reason}")
  skipped.append((line, reason))


def write_clotho_captions(folder: str, split: str, rows: list) -> None:
  """Writes folder/clotho_captions_{split}.csv: the header, then [file_name, caption_1,
  .., caption_5] per clip (whole or not at all)."""
  files.write_csv(os.path.join(folder, layouts.CLOTHO_CAPTION_FILE.format(split=split)),
                  CLOTHO_COLUMNS, rows)


def read_clotho_captions(path: str, skip: bool = False) -> tuple[list, list]:
  """Reads `file_name,caption_1..caption_5`.

  Returns:
    (clips, skipped): Clip per good row, and (line, reason) per bad row when skip.
  """
  clips, skipped, seen = [], [], set()
  for line, row in _rows(path, CLOTHO_COLUMNS):
    name = (row["file_name"] or "").strip()
    captions = tuple((row[c] or "").strip() for c in CLOTHO_COLUMNS[1:])
    if not name:
      _keep_or_raise(path, line, "empty file_name", skip, skipped)
    elif name in seen:
      _keep_or_raise(path, line, f"duplicate file_name {name!r}", skip, skipped)
    elif not all(clean_text(c) for c in captions):
      _keep_or_raise(path, line, f"empty caption for {name!r}", skip, skipped)
    else:
      seen.add(name)
      clips.append(Clip(name, captions, line))
  return clips, skipped


def read_audiocaps_captions(path: str, skip: bool = False) -> tuple[list, list]:
  """Reads AudioCaps' `audiocap_id,youtube_id,start_time,caption`, grouped per clip.

  A clip's file is `{youtube_id}_{start_time}.wav` (any of .wav, .flac, .mp3 is
  accepted by the builder); its captions keep the CSV's order.
  """
  grouped, first_line, skipped = {}, {}, []
  for line, row in _rows(path, AUDIOCAPS_COLUMNS):
    youtube_id, start = (row["youtube_id"] or "").strip(), (row["start_time"] or "").strip()
    text = (row["caption"] or "").strip()
    if not youtube_id or not start.isdigit():
      _keep_or_raise(path, line, "bad youtube_id or start_time", skip, skipped)
    elif not clean_text(text):
      _keep_or_raise(path, line, "empty caption", skip, skipped)
    else:
      name = f"{youtube_id}_{start}"
      grouped.setdefault(name, []).append(text)
      first_line.setdefault(name, line)
  return [Clip(n, tuple(c), first_line[n]) for n, c in grouped.items()], skipped


def assign_splits(file_names, seed: int = SPLIT_SEED) -> dict:
  """{file name: split}: a seeded permutation of the sorted names, 15% validation, 15%
  evaluation (at least one each from three files on) and the rest development.

  >>> assign_splits(["a.wav", "b.wav", "c.wav"])
  {'a.wav': 'evaluation', 'b.wav': 'development', 'c.wav': 'validation'}
  """
  names = sorted(set(file_names))
  order = np.random.default_rng(seed).permutation(len(names))
  counts = {split: max(1, round(share * len(names))) if len(names) >= 3 else 0
            for split, share in SPLIT_SHARES.items()}
  splits = ["validation"] * counts["validation"] + ["evaluation"] * counts["evaluation"]
  splits += ["development"] * (len(names) - len(splits))
  return dict(sorted((names[i], split) for i, split in zip(order, splits)))


@dataclasses.dataclass(frozen=True)
class Pairs:
  """A captions.csv of pairs, grouped into clips per split.

  clips: {split: [Clip]}; skipped: [(line, reason)]; assigned: whether the splits were
  made by `assign_splits` (the file has no split column).
  """
  clips: dict
  skipped: list
  assigned: bool


def read_pairs(path: str, skip: bool = False) -> Pairs:
  """Reads `file_name,caption[,split]`: any number of rows (captions) per file.

  `file_name` is relative to the CSV's folder; a split is one of `SPLIT_NAMES`
  (development, validation, evaluation, or train, val, test). Without a split column
  every file is assigned one by `assign_splits`.
  """
  grouped, first_line, split_of, skipped, seen = {}, {}, {}, [], set()
  with_split = None
  for line, row in _rows(path, PAIRS_COLUMNS):
    if with_split is None:
      with_split = "split" in row
    name, text = (row["file_name"] or "").strip(), (row["caption"] or "").strip()
    split = SPLIT_NAMES.get((row.get("split") or "").strip().lower()) if with_split else None
    if not name:
      _keep_or_raise(path, line, "empty file_name", skip, skipped)
    elif os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
      _keep_or_raise(path, line, f"file_name {name!r} must be relative to the CSV's folder, "
                     "inside it", skip, skipped)
    elif not clean_text(text):
      _keep_or_raise(path, line, f"empty caption for {name!r}", skip, skipped)
    elif (name, text) in seen:
      _keep_or_raise(path, line, f"duplicate row: {name!r} with the same caption", skip,
                     skipped)
    elif with_split and split is None:
      _keep_or_raise(path, line, f"unknown split {row['split']!r} for {name!r}; use one of "
                     f"{sorted(SPLIT_NAMES)}", skip, skipped)
    elif with_split and split_of.setdefault(name, split) != split:
      _keep_or_raise(path, line, f"{name!r} is in split {split_of[name]!r} at line "
                     f"{first_line[name]} and in {split!r} here", skip, skipped)
    else:
      seen.add((name, text))
      grouped.setdefault(name, []).append(text)
      first_line.setdefault(name, line)
  if not with_split:
    split_of = assign_splits(grouped)
  clips = {split: [] for split in layouts.SPLITS}
  for name, texts in grouped.items():
    clips[split_of[name]].append(Clip(name, tuple(texts), first_line[name]))
  empty = [split for split in layouts.SPLITS if not clips[split]]
  if empty:
    raise ValueError(f"{path}: no clips in the {', '.join(empty)} split(s) ({len(grouped)} "
                     "files in all); training needs each split to hold at least one file")
  return Pairs(clips, skipped, not with_split)
