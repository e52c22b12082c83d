"""The data ntxr reads, by name: the data folder layouts (Clotho v2, AudioCaps, a folder
of pairs) and their split names, the caption cleanings, and the built-in corpus's sizes
and sample rate. Names and `layout_of` only, free of TensorFlow and librosa, so that
`ntxr.settings` checks a config with them; `ntxr.data` reads the data."""

import os

CLOTHO_CAPTION_FILE = "clotho_captions_{split}.csv"
SPLITS = ("development", "validation", "evaluation")  # Clotho's, and ntxr's own pairs'
# The caption file that marks each layout a data folder may have, in the order tried.
LAYOUT_SPLITS = {"clotho": SPLITS, "audiocaps": ("train", "val", "test"), "pairs": SPLITS}
LAYOUT_FILES = {"clotho": CLOTHO_CAPTION_FILE.format(split=SPLITS[0]),
                "audiocaps": "train.csv", "pairs": "captions.csv"}
# The sample rate of a data folder's features where --config.sample_rate is 0 (Clotho's).
FOLDER_SAMPLE_RATE = 44100
TEXT_CLEANINGS = ("ntxr", "paper")  # their functions: `ntxr.data.captions.TEXT_CLEANING`

# The built-in corpus (`ntxr.data.synthetic`): its sample rate, and clips per split in
# Clotho's 3839 : 1045 : 1045 proportions; "clotho" has Clotho's shape (15 to 30 s
# clips), the others 3 to 6 s.
SYNTHETIC_SAMPLE_RATE = 16000
SYNTHETIC_SIZES = {"tiny": (24, 8, 8), "default": (1000, 272, 272),
                   "large": (3839, 1045, 1045), "clotho": (3839, 1045, 1045)}


def layout_of(root: str) -> str:
  """The layout of the data folder `root`: a name in LAYOUT_FILES; ValueError if none."""
  if not os.path.isdir(root):
    raise ValueError(f"{root}: no such folder; pass a Clotho v2 or AudioCaps folder, or one "
                     "holding captions.csv")
  for layout, name in LAYOUT_FILES.items():
    if os.path.isfile(os.path.join(root, name)):
      return layout
  raise ValueError(f"{root}: not a Clotho v2, AudioCaps or pairs folder (none of "
                   f"{', '.join(LAYOUT_FILES.values())})")
