"""Caption files of Clotho v2 (and AudioCaps) and the paper's text cleaning.

Bad rows raise ValueError naming the file and line, or, with skip=True, are left out
and reported in the returned `skipped` list as (line, reason).
"""

import csv
import dataclasses
import re

CAPTIONS_PER_CLIP = 5
CLOTHO_COLUMNS = ["file_name"] + [f"caption_{k}" for k in range(1, CAPTIONS_PER_CLIP + 1)]
AUDIOCAPS_COLUMNS = ["audiocap_id", "youtube_id", "start_time", "caption"]


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


TEXT_CLEANING = {"ntxr": clean_text, "paper": clean_text_paper}


def _rows(path: str, columns: list):
  """Yields (line number, row dict) of a UTF-8 CSV whose header holds `columns`."""
  try:
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      missing = [c for c in columns if c not in (reader.fieldnames or [])]
      if missing:
        raise ValueError(f"{path}:1: missing columns {missing}; expected {columns}")
      for row in reader:
        yield reader.line_num, row
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e})") from e
  except FileNotFoundError as e:
    raise ValueError(f"{path}: caption file not found") from e


def _keep_or_raise(path, line, reason, skip, skipped):
  if not skip:
    raise ValueError(f"{path}:{line}: {reason}")
  skipped.append((line, reason))


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
