"""Search a folder of recordings with a trained model, by text or by a recording.

  python -m ntxr.search --workdir=W --audio_dir=DIR --query="a dog barks" [--query=...]
      [--queries=FILE] [--audio_query=FILE] [--top_k=10] [--json=PATH]

The first call indexes every wav, flac, mp3 and ogg file under DIR, recursively, with W's
best checkpoint, W's config and its tokenizer: log-mel features exactly as training had
them, frame embeddings kept as float16 in W/search/<folder key>/index.npz (or where W
cannot be written, in search/<W key>/<folder key>/ of the run's cache_dir). Later calls
embed only new or changed files (by size and modification time), drop removed ones, and
rebuild an index made with another checkpoint. DIR is only read. A file that cannot be
decoded is skipped, counted and listed, and tried again once it changes.

The score is the model's own (config.score: alignment or pooled): ranking a folder gives
the order of `evaluate.score_matrix`, the evaluation's all-pairs scores.
"""

import dataclasses
import hashlib
import io
import json
import os
import sys
import time
import zipfile
from typing import Callable, Optional, TYPE_CHECKING

from ntxr import ctrl_c

if __name__ == "__main__":  # first: a Ctrl-C while the imports below load costs one line
  ctrl_c.exit_at_once()

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np
import tqdm

from ntxr import cli, command, files, settings
# pylint: enable=wrong-import-position

if TYPE_CHECKING:  # JAX loads when a command needs it, after --help
  from ntxr import evaluate

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")


def audio_files(audio_dir: str) -> dict:
  """{path relative to audio_dir: (size, mtime_ns)} of its audio files, recursively."""
  if not os.path.isdir(audio_dir):
    raise FileNotFoundError(f"{audio_dir}: no such folder")
  found = {}
  for folder, subfolders, names in os.walk(audio_dir):
    subfolders.sort()
    for name in sorted(names):
      if name.lower().endswith(AUDIO_EXTENSIONS) and not name.startswith("."):
        stat = os.stat(os.path.join(folder, name))
        found[os.path.relpath(os.path.join(folder, name), audio_dir)] = (
            stat.st_size, stat.st_mtime_ns)
  return found


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir's run trained with; FileNotFoundError if it holds no run."""
  config = settings.saved(workdir)
  if config is None:
    raise FileNotFoundError(f"{workdir}: not a run's workdir (no config.json)")
  return ml_collections.ConfigDict(config)


class Model:
  """A workdir's best checkpoint with the settings, tokenizer and features it trained with."""

  def __init__(self, workdir: str):
    # Imported here, with TensorFlow: a command that stops at a bad flag or workdir does
    # so before seconds of imports. A notebook gets TensorFlow without its C++ lines.
    command.import_tensorflow()
    # pylint: disable=g-import-not-at-top
    from ntxr import checkpoints as checkpoints_lib, experiment as experiment_lib
    self.settings = settings.Settings.of(read_config(workdir))
    self.experiment = experiment_lib.Experiment.of(self.settings)
    with checkpoints_lib.Checkpoints(workdir) as checkpoints:
      restored = checkpoints.restore("best", self.experiment.initial_state)
    if restored is None:
      raise FileNotFoundError(f"{workdir}: no checkpoint to search with; train first")
    self.state, progress = restored
    self.checkpoint = f"best/{int(self.state.step)}/" + hashlib.sha1(
        json.dumps(progress, sort_keys=True).encode()).hexdigest()[:12]
    self.logmel = self.experiment.corpus.builder.builder_config.logmel
    self.embedder = self.experiment.evaluation.embedder(self.state)

  def embed_files(self, paths: list, dtype=np.float32, group: int = 256,
                  stop: Callable[[], bool] = lambda: False) -> tuple:
    """({index: frame embeddings [T_i, E] in dtype} of the files that decode, {index:
    reason} of the rest); `group` files' features at a time, so memory stays bounded.
    Once `stop()` is true, the files not yet read are left out of both."""
    from ntxr.data import features  # pylint: disable=g-import-not-at-top
    embedded, failed = {}, {}
    bar = tqdm.tqdm(total=len(paths), desc="indexing", unit="file", file=sys.stderr,
                    disable=None if paths else True)  # None: no bar off a terminal
    for start in range(0, len(paths), group):
      clips = {}
      for i in range(start, min(start + group, len(paths))):
        if stop():
          break
        try:
          clips[i] = features.clip_features(paths[i], self.logmel)
        except ValueError as error:
          failed[i] = str(error)
        bar.update()
      frames = self.embedder.features(list(clips.values()))
      embedded.update((i, f.astype(dtype)) for i, f in zip(clips, frames))
    bar.close()
    return embedded, failed

  def embed_queries(self, queries: list) -> tuple:
    """(word embeddings [Q, W, E], mask [Q, W]); ValueError for an empty query, and a
    warning for one longer than the text encoder reads (the run's max_tokens)."""
    for query in queries:
      if not query.strip():
        raise ValueError("a query is empty: give words to search for")
      tokens = self.experiment.corpus.tokenizer.length(query)
      if tokens > self.settings.data.max_tokens:
        logging.warning("the query %r is %d tokens long: the text encoder reads its first "
                        "%d (the run's max_tokens)", query[:60], tokens,
                        self.settings.data.max_tokens)
    return self.embedder.captions(queries)


@dataclasses.dataclass
class Index:
  """Frame embeddings of a folder's recordings, made with one checkpoint.

  files: paths relative to the folder [C]; signatures: their (size, mtime_ns) [C];
  frames: [T_i, E] per file (float16 by default); skipped: {path: ((size, mtime_ns),
  reason)} of files that did not decode. Not saved: embedded, how many files the call
  that made it embedded; model, the Model that `search` and `similar` query with.

    index = Index.open(Model(workdir), workdir, folder)   # made, or brought up to date
    index.search(["a dog barks"], top_k=10)               # [[(file, score), ...]]
  """
  folder: str
  checkpoint: str
  files: list = dataclasses.field(default_factory=list)
  signatures: list = dataclasses.field(default_factory=list)
  frames: list = dataclasses.field(default_factory=list)
  skipped: dict = dataclasses.field(default_factory=dict)
  embedded: int = dataclasses.field(default=0, compare=False)
  model: Optional[Model] = dataclasses.field(default=None, compare=False, repr=False)
  _clips: Optional["evaluate.Clips"] = dataclasses.field(default=None, init=False,
                                                        repr=False, compare=False)

  @classmethod
  def build(cls, model: Model, folder: str, previous: Optional["Index"] = None,
            dtype=np.float16, stop: Callable[[], bool] = lambda: False) -> "Index":
    """The index of `folder`, reusing `previous` for files unchanged since it was made
    with the same checkpoint; raises FileNotFoundError when the folder has no audio.
    Once `stop()` is true no other file is embedded: the index holds those embedded."""
    found = audio_files(folder)
    if not found:
      raise FileNotFoundError(f"{folder}: no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    kept, tried = {}, {}
    if previous is not None and previous.checkpoint == model.checkpoint:
      kept = {name: frames for name, signature, frames in zip(
          previous.files, previous.signatures, previous.frames) if found.get(name) == signature}
      tried = {name: entry for name, entry in previous.skipped.items()
               if found.get(name) == tuple(entry[0])}
    new = [name for name in found if name not in kept and name not in tried]
    embedded, failed = model.embed_files([os.path.join(folder, name) for name in new], dtype,
                                         stop=stop)
    kept.update((new[i], frames) for i, frames in embedded.items())
    tried.update((new[i], (found[new[i]], reason)) for i, reason in failed.items())
    names = [name for name in found if name in kept]
    if not names and not stop():
      raise ValueError(f"{folder}: none of its {len(found)} audio files can be decoded: "
                       + "; ".join(reason for _, reason in tried.values()))
    return cls(os.path.abspath(folder), model.checkpoint, names, [found[n] for n in names],
               [kept[n] for n in names], tried, embedded=len(embedded), model=model)

  @classmethod
  def open(cls, model: Model, workdir: str, folder: str,
           stop: Callable[[], bool] = lambda: False) -> "Index":
    """The folder's index kept for workdir (`index_path`), brought up to date and saved if
    it was not; a torn or unreadable one is made again. Stopped (`build`), it saves what
    it embedded, which the next call keeps."""
    path = index_path(workdir, folder)
    previous = None
    if files.exists(path):
      try:
        previous = cls.load(path)
      except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        logging.warning("%s cannot be read (%s): indexing again", path, error)
    index = cls.build(model, folder, previous, stop=stop)
    if previous is None or (index.checkpoint, index.files, index.signatures, index.skipped) != (
        previous.checkpoint, previous.files, previous.signatures, previous.skipped):
      index.save(path)
    return index

  def save(self, path: str) -> None:
    """Writes the index to `path` (.npz) atomically."""
    lengths = np.array([len(f) for f in self.frames], np.int64)
    meta = dict(folder=self.folder, checkpoint=self.checkpoint, files=self.files,
                signatures=self.signatures, skipped=self.skipped)
    stored = io.BytesIO()
    np.savez(stored, meta=np.array(json.dumps(meta)), lengths=lengths,
             frames=np.concatenate(self.frames) if self.frames else np.zeros((0, 0)))
    files.makedirs(os.path.dirname(path))
    files.write_bytes(path, stored.getvalue())

  @classmethod
  def load(cls, path: str, model: Optional[Model] = None) -> "Index":
    """The index saved at `path`, searching with `model` if given."""
    with np.load(io.BytesIO(files.read_bytes(path))) as stored:
      meta, lengths, frames = json.loads(str(stored["meta"])), stored["lengths"], stored["frames"]
    meta["signatures"] = [tuple(s) for s in meta["signatures"]]
    meta["skipped"] = {name: (tuple(signature), reason)
                       for name, (signature, reason) in meta["skipped"].items()}
    return cls(**meta, frames=np.split(frames, np.cumsum(lengths)[:-1]) if len(lengths) else [],
               model=model)

  def scores(self, queries: np.ndarray, query_mask: np.ndarray, score: str) -> np.ndarray:
    """[C, Q] float32 scores of every file against queries [Q, W, E] (word or frame
    embeddings), by `evaluate.Clips` (made once per index and score, then reused)."""
    from ntxr import evaluate  # pylint: disable=g-import-not-at-top
    if self._clips is None or self._clips.score != score:
      self._clips = evaluate.Clips.of(self.frames, [np.ones(len(f), bool) for f in self.frames],
                                      score=score)
    return self._clips.scores(queries, query_mask)

  def search(self, queries: list, top_k: int = 10) -> list:
    """Text-to-audio: per query, [(file, score)] best first."""
    text, mask = self._model().embed_queries(queries)
    return self.top(self.scores(text, mask, self.model.settings.loss.score), top_k)

  def similar(self, recording: str, top_k: int = 10) -> list:
    """Audio-to-audio: [(file, score)] best first, by the audio-audio score against a
    recording (a path)."""
    embedded, failed = self._model().embed_files([recording])
    if failed:
      raise ValueError(failed[0])
    frames = embedded[0][None]
    return self.top(self.scores(frames, np.ones(frames.shape[:2], bool),
                                self.model.settings.loss.score), top_k)[0]

  def _model(self) -> Model:
    if self.model is None or self.model.checkpoint != self.checkpoint:
      raise ValueError("this index was not made with the model at hand: open it with "
                       "Index.open(model, workdir, folder)")
    return self.model

  def top(self, scores: np.ndarray, top_k: int) -> list:
    """Per column of scores [C, Q]: [(file, score)] best first (ties in file order)."""
    ranked = np.argsort(-scores, axis=0, kind="stable")[:top_k]
    return [[(self.files[i], float(scores[i, q])) for i in ranked[:, q]]
            for q in range(scores.shape[1])]


def _key(path: str) -> str:
  return hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]


def in_workdir(workdir: str) -> bool:
  """Whether search keeps what it makes in the workdir: unless it cannot be written (a
  read-only mount)."""
  return files.is_bucket(workdir) or os.access(workdir, os.W_OK)


def search_dir(workdir: str) -> str:
  """Where search keeps its indexes and compiled programs for workdir's run:
  workdir/search, or if the workdir cannot be written, search/<key of the workdir> in the
  run's cache (the cache_dir of its config)."""
  if in_workdir(workdir):
    return os.path.join(workdir, "search")
  return os.path.join(os.path.expanduser(read_config(workdir).cache_dir), "search",
                      _key(workdir))


def index_path(workdir: str, folder: str) -> str:
  """Where the index of folder is kept: <key of its absolute path>/ in `search_dir`."""
  return os.path.join(search_dir(workdir), _key(folder), "index.npz")


def format_results(query: str, results: list) -> str:
  lines = [f"query: {query}", " rank   score  file"]
  lines += [f"{rank:5d}  {score:6.4f}  {name}" for rank, (name, score) in enumerate(results, 1)]
  return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """This command's flags (defined where it starts, not when ntxr.search is imported)."""
  cli.define_workdir("the trained run's workdir, whose best checkpoint searches")
  cli.define_json()
  flags.DEFINE_string("audio_dir", None, "the folder of recordings to search", required=True)
  flags.DEFINE_multi_string("query", [], "a text query (repeatable)")
  flags.DEFINE_string("queries", None, "a file of text queries, one per line")
  flags.DEFINE_string("audio_query", None, "rank by similarity to this recording")
  flags.DEFINE_integer("top_k", 10, "results per query", lower_bound=1)


def main(argv):
  command.start(argv)
  workdir, audio_dir = (os.path.expanduser(path or "")
                        for path in (FLAGS.workdir, FLAGS.audio_dir))
  try:  # the command's own mistakes (usage: exit status 2), before anything is read
    if not workdir:
      raise ValueError("--workdir: give the trained run's workdir to search with")
    if not os.path.isdir(audio_dir):
      raise FileNotFoundError(f"--audio_dir={audio_dir}: no such folder")
    if FLAGS.queries and not os.path.isfile(FLAGS.queries):
      raise FileNotFoundError(f"--queries={FLAGS.queries}: no such file")
    if FLAGS.audio_query and not os.path.isfile(FLAGS.audio_query):
      raise FileNotFoundError(f"--audio_query={FLAGS.audio_query}: no such file")
    if any(not query.strip() for query in FLAGS.query):
      raise ValueError("--query: a query is empty: give words to search for")
    queries = list(FLAGS.query)
    if FLAGS.queries:  # a byte-order mark or not; its blank lines are no queries
      queries += [line for line in files.read_utf8(FLAGS.queries).splitlines() if line.strip()]
    if not queries and not FLAGS.audio_query:
      raise ValueError("nothing to search for: give --query, --queries or --audio_query")
    if FLAGS.json:
      files.check_output("json", FLAGS.json, dict(
          queries=FLAGS.queries, audio_query=FLAGS.audio_query,
          workdir=os.path.join(workdir, "config.json")), data_dir=audio_dir)
    config = read_config(workdir)  # first: taking the lock would create a mistyped workdir
  except (FileNotFoundError, ValueError) as error:
    command.exit_with(error, 2)
  # pylint: disable=g-import-not-at-top  (JAX loads after --help and the command's mistakes)
  import jax
  from ntxr import workdir as workdir_lib
  try:
    # A later call reuses this call's compiled scoring blocks.
    kept = search_dir(workdir)
    jax.config.update("jax_compilation_cache_dir", os.path.join(kept, "compiled"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    locked = workdir if in_workdir(workdir) else kept  # a read-only workdir: the cache's
    with workdir_lib.in_use(locked), jax.default_matmul_precision(config.matmul_precision):
      model = Model(workdir)
      start = time.perf_counter()
      with ctrl_c.noted() as interrupted:  # the files embedded so far are saved
        index = Index.open(model, workdir, audio_dir, stop=interrupted)
      if interrupted():
        print(f"interrupted: the index keeps the files embedded so far ({len(index.files)}): "
              "rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
      index_s, start = time.perf_counter() - start, time.perf_counter()
      report = list(zip(queries, index.search(queries, FLAGS.top_k) if queries else []))
      search_s = time.perf_counter() - start
      if FLAGS.audio_query:
        report.append((FLAGS.audio_query, index.similar(FLAGS.audio_query, FLAGS.top_k)))
  except (FileNotFoundError, ValueError, workdir_lib.WorkdirError) as error:
    command.exit_with(error, 1)
  frames = sum(len(f) for f in index.frames)
  hours = frames * model.logmel.hop_seconds / 3600
  size = os.path.getsize(index_path(workdir, audio_dir)) / 2**20
  elsewhere = "" if in_workdir(workdir) else f", kept in {kept} ({workdir} is read-only)"
  print(f"{len(index.files)} files indexed in {audio_dir} ({index.embedded} embedded "
        f"now in {index_s:.1f} s, {index.embedded / max(index_s, 1e-9):.1f} files/s); index "
        f"{size:.1f} MiB for {hours:.2f} h of audio ({size / max(hours, 1e-9):.0f} "
        f"MiB/h){elsewhere}")
  if queries:
    print(f"{len(queries)} queries scored and ranked in {search_s:.2f} s")
  if index.skipped:
    print(f"{len(index.skipped)} files skipped: " + "; ".join(
        reason for _, reason in index.skipped.values()))
  for query, found in report:
    print("\n" + format_results(query, found))
  if FLAGS.json:
    files.write_json(FLAGS.json, [dict(query=query, results=[dict(file=name, score=score)
                                                              for name, score in found])
                                   for query, found in report])


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=command.parse_flags)
