"""TFDS builders for Clotho v2, AudioCaps and a folder of your own pairs (captions.csv).

Features are computed once at prepare time (in parallel worker processes when a split
has enough clips, see `workers.imap`) and stored as TFRecords; each builder config's
name records every feature parameter, so a change of parameters prepares a new dataset
instead of mixing. TFDS writes into a temporary folder and renames it when complete, so
an interrupted prepare leaves nothing a later run would trust.

  builder = NtxrClotho(data_dir=..., config=clotho_config(settings.Features(sample_rate=44100)))
  prepare(builder, manual_dir="/path/to/Clotho")
  builder.as_dataset(split="development")

Clips or rows left out with skip_bad_files are recorded in the prepared data's metadata
(`skipped(builder)`), so every later run that uses it can report them.
"""

import csv
import io
import os
import sys

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from ntxr import layouts, settings
from ntxr.data import captions, features, workers

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")


class FeatureConfig(tfds.core.BuilderConfig):
  """A builder config carrying the log-mel parameters."""

  def __init__(self, *, logmel: settings.Features, **kwargs):
    super().__init__(name=logmel.name, **kwargs)
    self.logmel = logmel


def clotho_config(logmel: settings.Features) -> FeatureConfig:
  return FeatureConfig(logmel=logmel, description=f"log-mel features: {logmel}")


class _CaptionedAudio(tfds.core.GeneratorBasedBuilder):
  """One example per clip: log-mel features and all its captions."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = []  # every feature config is built on demand (FeatureConfig)
  LAYOUT = ""  # its name in layouts.LAYOUT_FILES
  SPLITS = ()  # training, validation, test
  CAPTION_FILE = ""  # a split's caption file under the data folder, {split} filled in
  read_captions = None  # (csv path, skip) -> (clips, skipped rows), see ntxr.data.captions

  def __init__(self, *, skip_bad_files: bool = False, processes: int = 0, **kwargs):
    self.skip_bad_files = skip_bad_files
    self.processes = processes
    super().__init__(**kwargs)

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "audio_id": np.int64,
        "file_name": tfds.features.Text(),
        "logmel": tfds.features.Tensor(shape=(None, self.builder_config.logmel.width),
                                       dtype=np.float32),
        "captions": tfds.features.Sequence(tfds.features.Text()),
    }), metadata=tfds.core.MetadataDict(skipped={}))

  def _create_builder_config(self, builder_config, version):
    # Every FeatureConfig is made on demand, none registered: TFDS would warn that each is
    # a "custom data configuration".
    if isinstance(builder_config, FeatureConfig):
      return builder_config
    return super()._create_builder_config(builder_config, version)

  def _log_download_bytes(self):  # TFDS's "Downloading and preparing dataset ..." line
    print(f"Preparing log-mel features ({self.builder_config.name}) once, into {self.data_dir}",
          flush=True)

  def _log_download_done(self):
    pass

  def caption_texts(self, root: str, split: str) -> list:
    """Every caption of a split's caption file, in order."""
    return [c for clip in self._read(root, split)[0] for c in clip.captions]

  def _read(self, root: str, split: str):
    """(clips, skipped rows, caption file) of a split."""
    csv_path = os.path.join(root, self.CAPTION_FILE.format(split=split))
    return (*self.read_captions(csv_path, skip=self.skip_bad_files), csv_path)

  def _audio_path(self, root: str, split: str, clip: captions.Clip) -> str:
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    for split in self.SPLITS:
      self._read(root, split)  # fail before any work on a missing or malformed file
    return {split: self._generate_examples(root, split) for split in self.SPLITS}

  def _generate_examples(self, root, split):
    clips, skipped, csv_path = self._read(root, split)
    skipped = [(f"{csv_path}:{line}", reason) for line, reason in skipped]
    jobs = [(self._audio_path(root, split, clip), self.builder_config.logmel) for clip in clips]
    with workers.imap(features.features_or_error, jobs, self.processes, chunksize=8) as results:
      bar = tqdm.tqdm(zip(clips, results), total=len(clips), desc=f"features of {split}",
                      unit="clip", file=sys.stderr, leave=False,
                      disable=None)  # no bar off a terminal (logs, notebooks)
      for audio_id, (clip, logmel) in enumerate(bar):
        if isinstance(logmel, str):
          if not self.skip_bad_files:
            raise ValueError(f"{logmel} (named at {csv_path}:{clip.line}); "
                             "pass --config.skip_bad_files=true to leave such clips out")
          skipped.append((f"{csv_path}:{clip.line}", logmel))
          continue
        yield clip.file_name, dict(audio_id=audio_id, file_name=clip.file_name,
                                   logmel=logmel, captions=list(clip.captions))
    self.info.metadata["skipped"][split] = [f"{where}: {reason}" for where, reason in skipped]


class NtxrClotho(_CaptionedAudio):
  """Clotho v2 (or the built-in synthetic corpus, written in its layout)."""

  LAYOUT = "clotho"
  SPLITS = layouts.LAYOUT_SPLITS[LAYOUT]
  CAPTION_FILE = layouts.CLOTHO_CAPTION_FILE
  read_captions = staticmethod(captions.read_clotho_captions)
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download Clotho v2 from Zenodo (record 4783391) and unpack it into one folder holding
  clotho_captions_{development,validation,evaluation}.csv and the audio folders
  development/, validation/ and evaluation/. Pass that folder as --config.data_dir.
  """

  def _audio_path(self, root, split, clip):
    return os.path.join(root, split, clip.file_name)


class NtxrAudiocaps(_CaptionedAudio):
  """AudioCaps: {train,val,test}.csv and audio/{split}/{youtube_id}_{start}.{wav,flac,mp3,ogg}."""

  LAYOUT = "audiocaps"
  SPLITS = layouts.LAYOUT_SPLITS[LAYOUT]
  CAPTION_FILE = "{split}.csv"
  read_captions = staticmethod(captions.read_audiocaps_captions)
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Place AudioCaps' train.csv, val.csv and test.csv (audiocap_id,youtube_id,start_time,
  caption) in one folder, with each clip's audio fetched by you as
  audio/{split}/{youtube_id}_{start_time}.wav (or .flac, .mp3).
  """

  def _audio_path(self, root, split, clip):
    stem = os.path.join(root, "audio", split, clip.file_name)
    found = [stem + ext for ext in AUDIO_EXTENSIONS if os.path.exists(stem + ext)]
    return found[0] if found else stem + AUDIO_EXTENSIONS[0]


class NtxrPairs(_CaptionedAudio):
  """Your own pairs: captions.csv (`file_name,caption[,split]`, a row per caption) and the
  audio under the same folder. Without a split column the files are split by
  `captions.assign_splits`, and `split_file` says which went where."""

  LAYOUT = "pairs"
  SPLITS = layouts.LAYOUT_SPLITS[LAYOUT]
  CAPTION_FILE = layouts.LAYOUT_FILES["pairs"]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put captions.csv (file_name,caption and optionally split; file_name relative to the
  folder; a row per caption) and the audio it names in one folder. Pass that folder as
  --config.data_dir.
  """

  def pairs(self, root: str) -> captions.Pairs:
    return captions.read_pairs(os.path.join(root, self.CAPTION_FILE), skip=self.skip_bad_files)

  def _read(self, root, split):
    pairs = self.pairs(root)  # rows left out are reported once, with the first split
    return (pairs.clips[split], pairs.skipped if split == self.SPLITS[0] else [],
            os.path.join(root, self.CAPTION_FILE))

  def _audio_path(self, root, split, clip):
    return os.path.join(root, clip.file_name)


BUILDERS = (NtxrClotho, NtxrAudiocaps, NtxrPairs)


def builder_for(root: str) -> type:
  """The builder class whose layout the folder `root` has (Clotho v2, AudioCaps or pairs)."""
  return {builder.LAYOUT: builder for builder in BUILDERS}[layouts.layout_of(root)]


def split_file(pairs: captions.Pairs) -> str:
  """The CSV `file_name,split` of every file kept, in file-name order."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["file_name", "split"])
  writer.writerows(sorted((clip.file_name, split) for split, clips in pairs.clips.items()
                          for clip in clips))
  return out.getvalue()


def prepare(builder: _CaptionedAudio, manual_dir: str) -> None:
  """Prepares the builder's dataset from `manual_dir` unless done, with a progress bar per
  split (TFDS's own, per shard, are off). Nothing is written into `manual_dir`."""
  if not os.path.isdir(manual_dir):
    raise ValueError(f"{manual_dir}: no such folder.{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  tfds.disable_progress_bar()
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def skipped(builder: _CaptionedAudio) -> dict:
  """{split: ["file:line: reason", ...]} of what preparing left out (skip_bad_files)."""
  return dict(builder.info.metadata["skipped"])
