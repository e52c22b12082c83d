"""One call from a data folder (or none: the built-in corpus) to prepared clips and a tokenizer.

A user's data folder is only read: the prepared TFRecords and the tokenizer live in the
cache, in one folder per source folder. A cache in a bucket (gs://...) is kept in a local
folder on each machine that uses it: a machine downloads a prepared folder the bucket
holds, or prepares it and uploads it, so that it is prepared once for every worker and
every relaunch.
"""

import dataclasses
import glob
import hashlib
import os
import shutil
import time
from typing import Optional

from absl import logging

from ntxr import files, settings
from ntxr.data import builders, captions, synthetic, tokenizer

STAGE_DIR = "~/.cache/ntxr/staged"  # where a bucket cache's local copies live
UPLOADED = "ntxr_uploaded.json"  # in a bucket's prepared folder, written after its files
SPLITS_FILE = "splits.csv"  # in a pairs folder's prepared folder: the assigned splits


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A prepared corpus: its builder (splits in `splits`: training, validation, test),
  caption tokenizer, what preparing left out, how long generating and preparing took
  in this call (0 when cached), and for the built-in corpus each clip's event kinds
  ({split: {file name: [kinds]}}; None for recorded data)."""
  builder: builders.NtxrClotho
  tokenizer: object
  skipped: dict
  generate_s: float
  prepare_s: float
  events: Optional[dict] = None

  @property
  def splits(self) -> tuple:
    return self.builder.SPLITS


def _tokenizer(kind: str, captions: list, folder: str, vocab_size: int, cleaning: str,
               vocabulary: str):
  """The caption tokenizer of `kind`, trained once and cached in `folder`."""
  os.makedirs(folder, exist_ok=True)
  if kind == "words":
    return tokenizer.WordTokenizer(tokenizer.train_words(
        captions, os.path.join(folder, f"words_{cleaning}_{vocabulary}.txt"), cleaning))
  path = os.path.join(folder, f"spm_{vocab_size}_{cleaning}_{vocabulary}.model")
  return tokenizer.Tokenizer(tokenizer.train(captions, path, vocab_size, cleaning), cleaning)


def _digest(text: str) -> str:
  return hashlib.sha1(text.encode()).hexdigest()[:8]


def _prepared_dir(cache_dir: str, data_dir: str) -> str:
  """Where data_dir's prepared TFRecords live: one folder per source folder (the built-in
  corpus, generated inside the cache, by its name alone)."""
  source = os.path.abspath(data_dir)
  if os.path.dirname(source) == os.path.abspath(cache_dir):
    return os.path.join(cache_dir, "tfds", os.path.basename(source))
  return os.path.join(cache_dir, "tfds", f"{os.path.basename(source)}-{_digest(source)}")


def _local_copy(cache_dir: str, stage_dir: str) -> str:
  """The local folder that stands for the bucket cache_dir on this machine."""
  name = os.path.basename(cache_dir.rstrip("/"))
  return os.path.join(os.path.expanduser(stage_dir), f"{name}-{_digest(cache_dir)}")


def _is_leftover(name: str) -> bool:
  """Whether a prepared folder's file is what an interrupted write left behind."""
  return "incomplete" in name or files.PARTIAL in name


def _download(bucket_copy: str, prepared: str) -> None:
  """Copies a prepared folder the bucket holds whole into `prepared`, if that is missing:
  into a partial folder first, renamed into place once every file is there."""
  if os.path.isdir(prepared) or not files.exists(f"{bucket_copy}/{UPLOADED}"):
    return
  for stale in glob.glob(f"{glob.escape(prepared)}{files.PARTIAL}*"):  # killed downloads
    shutil.rmtree(stale)
  partial = files.partial_path(prepared)
  names = [name for name in files.file_tree(bucket_copy) if name != UPLOADED]
  for name in names:
    files.copy_file(f"{bucket_copy}/{name}", os.path.join(partial, name))
  os.replace(partial, prepared)
  logging.info("downloaded the prepared data (%d files) from %s", len(names), bucket_copy)


def _upload(prepared: str, bucket_copy: str) -> None:
  """Uploads the files of `prepared` the bucket lacks, then marks the bucket's copy whole."""
  present = set(files.file_tree(bucket_copy))
  names = [name for name in files.file_tree(prepared)
           if name not in present and not _is_leftover(name)]
  for name in names:
    files.copy_file(os.path.join(prepared, name), f"{bucket_copy}/{name}")
  if UPLOADED not in present:
    files.write_json(f"{bucket_copy}/{UPLOADED}", dict(files=len(names)))
  if names:
    logging.info("uploaded %d prepared files to %s", len(names), bucket_copy)


def _record_splits(pairs, path: str) -> None:
  """Writes which split each file of a captions.csv went to, and says so once when the
  splits were assigned (no split column)."""
  if not pairs.assigned or files.exists(path):
    return
  files.write_text(path, builders.split_file(pairs))
  counts = ", ".join(f"{len(clips)} {split}" for split, clips in pairs.clips.items())
  logging.warning("captions.csv has no split column: its files were split %s (seed %d); "
                  "the split is recorded in %s", counts, captions.SPLIT_SEED, path)


def load(data_dir=None, *, cache_dir, size="default", logmel=settings.Features(),
         tokens="sentencepiece", vocab_size=1000, cleaning="ntxr", vocabulary="training",
         skip_bad_files=False, stage_dir=STAGE_DIR) -> Corpus:
  """Prepares (once) and opens a Clotho v2, AudioCaps or pairs folder, or the built-in corpus.

  Args:
    data_dir: a Clotho v2 or AudioCaps folder, or one holding captions.csv (told apart by
      their caption files), or None for the built-in synthetic corpus of `size`.
    cache_dir: a local folder, or a bucket folder kept in a local copy under stage_dir.
    logmel: feature parameters; sample_rate 0 takes the corpus's own (16 kHz synthetic,
      44.1 kHz otherwise).
    tokens: "sentencepiece" (vocab_size pieces) or "words" (every word seen).
    cleaning: caption cleaning, a name in `captions.TEXT_CLEANING`.
    vocabulary: "training" (the training split's captions) or "all" (every split's, as
      the authors' frozen word2vec vocabulary).
  """
  if vocabulary not in settings.VOCABULARIES:
    raise ValueError(f"vocabulary must be one of {settings.VOCABULARIES}, not {vocabulary!r}")
  bucket = files.is_bucket(cache_dir)
  local = _local_copy(cache_dir, stage_dir) if bucket else cache_dir
  # Processes sharing a cache (a sweep's parallel runs) generate and prepare it one at a
  # time; the others then reuse it.
  with files.locked(os.path.join(local, "lock"), wait=True):
    generate_s = 0.0
    if data_dir is None:
      start = time.perf_counter()
      data_dir = synthetic.generate(os.path.join(local, f"synthetic_{size}"), size)
      generate_s = time.perf_counter() - start
      logmel = dataclasses.replace(logmel, sample_rate=logmel.sample_rate or synthetic.SAMPLE_RATE)
    logmel = dataclasses.replace(logmel, sample_rate=logmel.sample_rate or 44100)
    builder_class = builders.builder_for(data_dir)
    prepared = _prepared_dir(local, data_dir)
    bucket_copy = f"{cache_dir.rstrip('/')}/{os.path.relpath(prepared, local)}"
    if bucket:
      _download(bucket_copy, prepared)
    builder = builder_class(data_dir=prepared, config=builders.clotho_config(logmel),
                            skip_bad_files=skip_bad_files)
    start = time.perf_counter()
    builders.prepare(builder, data_dir)
    prepare_s = time.perf_counter() - start
    if builder_class is builders.NtxrPairs:
      _record_splits(builder.pairs(data_dir), os.path.join(prepared, SPLITS_FILE))
    splits = builder.SPLITS if vocabulary == "all" else builder.SPLITS[:1]
    captions = [c for split in splits for c in builder.caption_texts(data_dir, split)]
    tok = _tokenizer(tokens, captions, os.path.join(prepared, "tokenizers"), vocab_size,
                     cleaning, vocabulary)
    if bucket:
      _upload(prepared, bucket_copy)
  skipped = builders.skipped(builder)
  for split, entries in skipped.items():
    if entries:
      logging.warning("%s: %d clips or rows were left out when the data was prepared "
                      "(skip_bad_files): %s", split, len(entries), "; ".join(entries))
  return Corpus(builder, tok, skipped, generate_s, prepare_s, synthetic.read_events(data_dir))


def load_data(data: settings.Data) -> Corpus:
  """`load` with a run's data settings."""
  return load(data.data_dir, cache_dir=data.cache_dir, stage_dir=data.stage_dir or STAGE_DIR,
              size=data.size, logmel=data.features, tokens=data.tokens,
              vocab_size=data.vocab_size, cleaning=data.text_cleaning,
              vocabulary=data.vocabulary, skip_bad_files=data.skip_bad_files)
