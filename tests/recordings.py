"""Clotho, AudioCaps and pairs folders built from the real recordings in data/recordings.

Every split gets real recorded sound in the formats users bring (wav, flac, mp3, ogg; 16,
44.1 and 48 kHz; mono and stereo; names with spaces and non-ASCII letters). The evaluation
split adds a 30 s clip tiled from a recording (Clotho's longest) and a 50 ms clip cut from
one, shorter than the CRNN's pooling window (4 frames of 20 ms).
"""

import csv
import os
import shutil

import numpy as np
import soundfile

RECORDINGS = os.path.join(os.path.dirname(__file__), "data", "recordings")
LONG, SHORT = "long alarm, 30 s.wav", "short glass.wav"

CAPTIONS = {
    "front center.wav": (
        "A woman says the words front center.", "A female voice clearly announces front center.",
        "A calm voice speaks two words into a microphone.", "Someone says front center in a quiet room.",
        "A short spoken phrase from a woman."),
    "alarm clock.ogg": (
        "An alarm clock rings with a fast metallic bell.", "A mechanical bell rattles on and on.",
        "The loud ringing of an old alarm clock.", "A bell alarm keeps ringing rapidly.",
        "An old clock alarm is going off."),
    "glass of water.wav": (
        "Water is poured into a glass.", "Liquid splashes into a drinking glass.",
        "Someone pours a drink into a glass.", "A short pour of water into glass.",
        "Water fills a glass with a gurgle."),
    "canário.mp3": (
        "A canary sings a short trill.", "A small bird chirps a high song.",
        "Bird song from a canary in a cage.", "A songbird whistles a quick melody.",
        "High pitched chirping of a little bird."),
    "trumpet.mp3": (
        "A trumpet plays a single long note.", "A brass instrument sounds a bright tone.",
        "Someone blows one note on a trumpet.", "A loud trumpet note is held.",
        "A bright brass note from a trumpet."),
    "guitar.flac": (
        "A guitar string is plucked once.", "An acoustic guitar plays a short note.",
        "Someone plucks a guitar.", "A single plucked note on a guitar.",
        "A brief strum of a guitar string."),
    "piano.wav": (
        "A piano key is struck once.", "A single piano note rings out.",
        "Someone presses a key on a piano.", "A short note played on a piano.",
        "A piano tone decays slowly."),
    "camera shutter.flac": (
        "A camera shutter clicks.", "The click of a photo camera taking a picture.",
        "A mechanical shutter snaps once.", "Someone takes a photograph with a camera.",
        "A quick click and whir of a camera."),
    "violoncello.flac": (
        "A cello plays a low bowed note.", "A bow is drawn across a cello string.",
        "A deep string instrument plays one note.", "A low note on a violoncello.",
        "A cello sounds a warm long tone."),
    "klavichord.wav": (
        "A clavichord note is played.", "A keyboard instrument plucks a soft note.",
        "An old keyboard instrument sounds one tone.", "A short note on a clavichord.",
        "Someone plays a key on a clavichord."),
    "xylofón.mp3": (
        "A xylophone plays a rising run of notes.", "Wooden bars are struck in a quick melody.",
        "Someone plays a scale on a xylophone.", "Bright tapping notes of a xylophone.",
        "A mallet runs up a xylophone."),
    "electric piano.flac": (
        "An electric piano plays a chord.", "A soft keyboard chord rings out.",
        "Someone plays a chord on an electric piano.", "A mellow electric piano tone.",
        "A keyboard chord fades away."),
    LONG: (
        "An alarm clock rings again and again for a long time.", "A bell alarm rings repeatedly.",
        "A metallic bell keeps ringing over and over.", "The alarm clock does not stop ringing.",
        "Ringing from an alarm clock continues."),
    SHORT: (
        "A tiny splash of water.", "A very short drop of liquid.", "A brief splash.",
        "A quick drip into a glass.", "A split second of pouring water."),
}

SPLITS = {
    "development": ("front center.wav", "alarm clock.ogg", "glass of water.wav", "canário.mp3",
                    "trumpet.mp3", "guitar.flac", "piano.wav"),
    "validation": ("camera shutter.flac", "violoncello.flac", "klavichord.wav"),
    "evaluation": ("xylofón.mp3", "electric piano.flac", LONG, SHORT),
}


def _write_derived(folder: str) -> None:
  """The 30 s clip (the alarm clock tiled, 44.1 kHz stereo) and the 50 ms one."""
  alarm, rate = soundfile.read(os.path.join(RECORDINGS, "alarm clock.ogg"), always_2d=True)
  tiled = np.tile(alarm, (int(np.ceil(30 * rate / len(alarm))), 1))[:30 * rate]
  soundfile.write(os.path.join(folder, LONG), tiled, rate)
  glass, rate = soundfile.read(os.path.join(RECORDINGS, "glass of water.wav"))
  start = int(np.argmax(np.abs(glass) > 0.05))  # where the pour is audible
  soundfile.write(os.path.join(folder, SHORT), glass[start:start + rate // 20], rate)


def write_csv(path: str, header: list, rows: list) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows([header, *rows])


def clotho_folder(root: str) -> str:
  """Writes a Clotho v2-layout folder of the real recordings under root; returns it."""
  for split, names in SPLITS.items():
    audio = os.path.join(root, split)
    os.makedirs(audio)
    for name in names:
      if name not in (LONG, SHORT):
        shutil.copy(os.path.join(RECORDINGS, name), audio)
    if split == "evaluation":
      _write_derived(audio)
    write_csv(os.path.join(root, f"clotho_captions_{split}.csv"),
              ["file_name"] + [f"caption_{k}" for k in range(1, 6)],
              [[name, *CAPTIONS[name]] for name in names])
  return root


# People's judgements of the evaluation split, in DCASE 2025's and TAU's layouts: each
# caption's matching clips (the two tonal instruments match each other's captions), and
# two rated captions with 0-100 ratings of every clip.
MATCHING = {"xylofón.mp3": ("xylofón.mp3", "electric piano.flac"),
            "electric piano.flac": ("electric piano.flac", "xylofón.mp3"),
            LONG: (LONG,), SHORT: (SHORT,)}
RATINGS = {("xylofón.mp3", 0): {"xylofón.mp3": 95, "electric piano.flac": 40, LONG: 5,
                                SHORT: 0},
           (LONG, 1): {LONG: 90, "xylofón.mp3": 10, "electric piano.flac": 0, SHORT: 20}}


def judged_by_people(data: str, tau: str) -> None:
  """Writes metadata_eval.csv beside a Clotho folder's captions, and a TAU-layout folder
  of ratings of its evaluation clips (fid and tid are made-up identifiers)."""
  write_csv(os.path.join(data, "metadata_eval.csv"), ["query", "audio_filenames"],
            [[caption, str(list(MATCHING[name]))] for name in SPLITS["evaluation"]
             for caption in CAPTIONS[name]])
  os.makedirs(tau)
  fid = {name: f"f{i}=" for i, name in enumerate(SPLITS["evaluation"])}
  write_csv(os.path.join(tau, "evaluation_audio_metadata.csv"),
            ["split", "fid", "file_name", "keywords"],
            [["clotho_evaluation", fid[name], name, ""] for name in SPLITS["evaluation"]])
  write_csv(os.path.join(tau, "evaluation_text.csv"), ["split", "tid", "fid", "text", "tokens"],
            [["clotho_evaluation", f"{fid[name]}{k}", fid[name], caption, "[]"]
             for name in SPLITS["evaluation"] for k, caption in enumerate(CAPTIONS[name])])
  write_csv(os.path.join(tau, "evaluation_relevances.csv"), ["tid", "fid", "fid_group", "rating"],
            [[f"{fid[name]}{k}", fid[rated], "TP" if rated == name else "C15", rating]
             for (name, k), ratings in RATINGS.items() for rated, rating in ratings.items()])


def audiocaps_folder(root: str) -> str:
  """Writes an AudioCaps-layout folder ({train,val,test}.csv, audio/{split}/{id}_{start}.ext)."""
  audiocap_id = 0
  for split, (_, names) in zip(("train", "val", "test"), SPLITS.items()):
    audio, rows = os.path.join(root, "audio", split), []
    os.makedirs(audio)
    for index, name in enumerate(n for n in names if n not in (LONG, SHORT)):
      youtube_id, extension = f"yt{split}{index:02d}", os.path.splitext(name)[1]
      shutil.copy(os.path.join(RECORDINGS, name), os.path.join(audio, f"{youtube_id}_30{extension}"))
      for caption in CAPTIONS[name]:
        audiocap_id += 1
        rows.append([audiocap_id, youtube_id, 30, caption])
    write_csv(os.path.join(root, f"{split}.csv"), ["audiocap_id", "youtube_id", "start_time",
                                                   "caption"], rows)
  return root


def pairs_folder(root: str, split_column: bool = True) -> str:
  """Writes a folder of your own pairs: the recordings in nested folders and captions.csv
  (saved with a byte-order mark, as spreadsheets save "CSV UTF-8") holding one to five
  captions per file, a file's captions on separate, interleaved rows. With split_column,
  SPLITS under the names train, val and test."""
  alias = {"development": "train", "validation": "val", "evaluation": "test"}
  rows, kept = [], []
  for split, names in SPLITS.items():
    for index, name in enumerate(n for n in names if n not in (LONG, SHORT)):
      relative = os.path.join(split[:3], "nested" if index % 2 else "", name)
      os.makedirs(os.path.dirname(os.path.join(root, relative)), exist_ok=True)
      shutil.copy(os.path.join(RECORDINGS, name), os.path.join(root, relative))
      kept.append((relative, CAPTIONS[name][:1 + index % 5], alias[split]))
  for k in range(5):  # first captions first, then second captions, ...
    rows += [[relative, texts[k]] + ([split] if split_column else [])
             for relative, texts, split in kept if k < len(texts)]
  with open(os.path.join(root, "captions.csv"), "w", newline="", encoding="utf-8-sig") as f:
    header = ["file_name", "caption"] + (["split"] if split_column else [])
    csv.writer(f).writerows([header, *rows])
  return root


def snapshot(folder: str) -> dict:
  """{relative path: (size, mtime_ns)} of every file and folder under folder."""
  found = {}
  for directory, subdirectories, names in os.walk(folder):
    for name in subdirectories + names:
      path = os.path.join(directory, name)
      stat = os.stat(path)
      found[os.path.relpath(path, folder)] = (stat.st_size, stat.st_mtime_ns)
  return found
