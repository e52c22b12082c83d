"""Search over a folder of recordings: the evaluation's order, an index that follows the
folder (real recordings: added, removed, corrupted files), the command and its errors."""

import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ntxr import scores, search, train
from recordings import RECORDINGS, snapshot


@pytest.fixture(scope="module")
def workdir(tiny_run, tmp_path_factory):
  """A copy of the tiny run's workdir, which the indexes below write into."""
  path = tmp_path_factory.mktemp("search") / "run"
  shutil.copytree(tiny_run, path)
  return str(path)


@pytest.fixture(scope="module")
def model(workdir):
  return search.Model(workdir)


@pytest.fixture()
def recordings(tmp_path):
  """The real recordings in a folder with a subfolder, as a user's collection."""
  folder = tmp_path / "collection"
  shutil.copytree(RECORDINGS, folder / "sounds")
  shutil.move(str(folder / "sounds" / "piano.wav"), folder / "piano.wav")
  return str(folder)


def test_search_ranks_a_split_as_its_evaluation_does(model, cache_dir):
  experiment, state = model.experiment, model.state
  split = experiment.evaluation.embed_split(state, experiment.test_split)
  expected = experiment.evaluation.runs_scores([split])[0]  # [clips, captions]
  named = experiment.corpus.captions(experiment.test_split)
  folder = os.path.join(cache_dir, "synthetic_tiny", "evaluation")
  index = search.Index.build(model, folder, dtype=np.float32)
  assert sorted(index.files) == sorted(name for name, _ in named)
  captions = [caption for _, captions in named for caption in captions]
  text, mask = model.embed_queries(captions)
  found = index.scores(text, mask, model.settings.loss.score)
  rows = [index.files.index(name) for name, _ in named]
  np.testing.assert_allclose(found[rows], expected, rtol=1e-5, atol=1e-7)
  ranked = index.search(captions, top_k=len(rows))
  for q, results in enumerate(ranked):
    assert [name for name, _ in results] == [named[i][0] for i in np.argsort(-expected[:, q],
                                                                              kind="stable")]
  compact = search.Index.build(model, folder)  # float16 frames, as the command keeps them
  assert compact.frames[0].dtype == np.float16
  np.testing.assert_allclose(compact.scores(text, mask, model.settings.loss.score), found,
                             atol=2e-3)


def test_audio_query_ranks_by_the_audio_audio_score(model, recordings):
  index = search.Index.build(model, recordings, dtype=np.float32)
  query = os.path.join(recordings, "sounds", "guitar.flac")
  results = index.similar(query, top_k=len(index.files))
  lengths = [len(f) for f in index.frames]
  audio = np.zeros((len(lengths), max(lengths), index.frames[0].shape[1]), np.float32)
  for i, frames in enumerate(index.frames):
    audio[i, :len(frames)] = frames
  mask = np.arange(max(lengths)) < np.array(lengths)[:, None]
  within = np.asarray(scores.symmetric_alignment_scores(audio, mask))
  guitar = index.files.index(os.path.join("sounds", "guitar.flac"))
  expected = np.argsort(-within[guitar], kind="stable")
  assert [name for name, _ in results] == [index.files[i] for i in expected]
  np.testing.assert_allclose([s for _, s in results], within[guitar][expected], rtol=1e-4)
  paths = [os.path.join(recordings, name) for name in index.files[:3]]
  in_twos, _ = model.embed_files(paths, group=2)  # features two files at a time: the same
  for i in range(3):
    np.testing.assert_allclose(in_twos[i], index.frames[i], rtol=1e-5, atol=1e-6)


def test_the_index_follows_the_folder(model, workdir, recordings, monkeypatch):
  before, tree = search.audio_files(recordings), snapshot(recordings)
  embedded = []
  embed = model.embed_files
  monkeypatch.setattr(model, "embed_files",
                      lambda paths, *args, **options: embedded.append(paths)
                      or embed(paths, *args, **options))
  first = search.Index.open(model, workdir, recordings)
  assert sorted(first.files) == sorted(before) and len(first.files) == 12  # every format
  assert os.path.join("sounds", "canário.mp3") in first.files and not first.skipped
  assert snapshot(recordings) == tree  # the folder is only read: no file or folder added
  path = search.index_path(workdir, recordings)
  assert os.path.dirname(os.path.dirname(path)) == os.path.join(workdir, "search")

  again = search.Index.open(model, workdir, recordings)  # nothing new: nothing embedded
  assert embedded[-1] == [] and again.files == first.files
  for a, b in zip(again.frames, first.frames):
    np.testing.assert_array_equal(a, b)

  added = os.path.join(recordings, "more", "second guitar.flac")
  os.makedirs(os.path.dirname(added))
  shutil.copy(os.path.join(recordings, "sounds", "guitar.flac"), added)
  os.remove(os.path.join(recordings, "piano.wav"))
  broken = os.path.join(recordings, "sounds", "trumpet.mp3")
  with open(broken, "rb") as f:
    trumpet = f.read()
  with open(broken, "wb") as f:
    f.write(b"\x00not audio" * 50)
  updated = search.Index.open(model, workdir, recordings)
  assert sorted(embedded[-1]) == sorted([added, broken])  # only the new and changed files
  assert os.path.join("more", "second guitar.flac") in updated.files
  assert "piano.wav" not in updated.files
  assert list(updated.skipped) == [os.path.join("sounds", "trumpet.mp3")]
  assert "trumpet.mp3: cannot decode audio" in updated.skipped[os.path.join("sounds",
                                                                              "trumpet.mp3")][1]
  found = updated.search(["a guitar string is plucked"], top_k=20)[0]
  assert sorted(name for name, _ in found) == sorted(updated.files)  # the new file too
  copy = updated.files.index(os.path.join("more", "second guitar.flac"))
  original = updated.files.index(os.path.join("sounds", "guitar.flac"))
  np.testing.assert_array_equal(updated.frames[copy], updated.frames[original])
  search.Index.open(model, workdir, recordings)
  assert embedded[-1] == []  # the broken file is not tried again until it changes
  with open(broken, "wb") as f:  # mended
    f.write(trumpet)
  mended = search.Index.open(model, workdir, recordings)
  assert embedded[-1] == [broken] and not mended.skipped
  assert os.path.join("sounds", "trumpet.mp3") in mended.files

  monkeypatch.setattr(model, "checkpoint", "another checkpoint")
  rebuilt = search.Index.open(model, workdir, recordings)
  assert len(embedded[-1]) == len(updated.files) + 1 and rebuilt.checkpoint == "another checkpoint"
  with open(path, "wb") as f:  # a torn index is made again
    f.write(b"PK\x03\x04 torn")
  assert search.Index.open(model, workdir, recordings).files == rebuilt.files


def test_an_index_stopped_midway_keeps_what_it_embedded(model, workdir, recordings,
                                                        monkeypatch):
  """Stopped after five files (the command stops it on Ctrl-C), the index saves those
  five, and the next call embeds only the other seven."""
  asked = itertools.count()  # asked before each file
  stopped = search.Index.open(model, workdir, recordings, stop=lambda: next(asked) >= 5)
  assert len(stopped.files) == 5
  assert search.Index.load(search.index_path(workdir, recordings)).files == stopped.files
  embedded = []
  embed = model.embed_files
  monkeypatch.setattr(model, "embed_files", lambda paths, *args, **options:
                      embedded.append(paths) or embed(paths, *args, **options))
  whole = search.Index.open(model, workdir, recordings)
  assert sorted(whole.files) == sorted(search.audio_files(recordings))
  assert len(embedded[0]) == 7 and not set(stopped.files) & {
      os.path.relpath(path, recordings) for path in embedded[0]}


def test_bad_searches_get_clear_errors(model, workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match="no audio files"):
    search.Index.build(model, str(tmp_path))
  (tmp_path / "notes.wav").write_bytes(b"not audio")
  with pytest.raises(ValueError, match="none of its 1 audio files can be decoded: .*notes.wav"):
    search.Index.build(model, str(tmp_path))
  with pytest.raises(ValueError, match="a query is empty"):
    model.embed_queries(["a dog", "  "])
  shutil.copy(os.path.join(RECORDINGS, "guitar.flac"), tmp_path / "song.flac")
  index = search.Index.build(model, str(tmp_path))
  assert list(index.skipped) == ["notes.wav"] and index.files == ["song.flac"]
  with pytest.raises(ValueError, match="not made with the model at hand"):
    dataclasses.replace(index, model=None).search(["a song"])
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  shutil.copy(os.path.join(workdir, "config.json"), untrained)
  with pytest.raises(FileNotFoundError, match="no checkpoint to search with; train first"):
    search.Model(str(untrained))


LONG_QUERY = " ".join(["a bird sings"] * 12)  # 36 words


def test_the_command_prints_and_writes_the_results(workdir, recordings, tmp_path):
  queries = tmp_path / "queries.txt"
  queries.write_text("a bird sings\n\na bell rings\n", encoding="utf-8-sig")  # as Notepad saves
  out = tmp_path / "results.json"
  run = subprocess.run(
      [sys.executable, "-m", "ntxr.search", f"--workdir={workdir}", f"--audio_dir={recordings}",
       "--query=a piano note", f"--queries={queries}", f"--query={LONG_QUERY}", "--top_k=3",
       f"--audio_query={recordings}/piano.wav", f"--json={out}"],
      capture_output=True, text=True, check=True)
  results = json.loads(out.read_text())
  assert [r["query"] for r in results] == ["a piano note", LONG_QUERY, "a bird sings",
                                           "a bell rings", f"{recordings}/piano.wav"]
  assert re.search(r"WARNING: the query 'a bird sings a bird .*' is \d+ tokens long: the text "
                   r"encoder reads its first 32 \(the run's max_tokens\)", run.stderr)
  for entry in results:
    assert len(entry["results"]) == 3
    assert all(os.path.isfile(os.path.join(recordings, r["file"])) for r in entry["results"])
    found = [r["score"] for r in entry["results"]]
    assert found == sorted(found, reverse=True)
  assert "12 files indexed" in run.stdout and "query: a bell rings" in run.stdout
  first = results[0]["results"][0]
  assert f"    1  {first['score']:6.4f}  {first['file']}" in run.stdout
  latin1 = tmp_path / "latin1.txt"
  latin1.write_bytes("a bird sings\na caf\u00e9 murmurs\n".encode("latin-1"))
  for flags, culprit in [
      ([f"--workdir={tmp_path}/none", f"--audio_dir={recordings}", "--query=x"],
       f"{tmp_path}/none: not a run's workdir (no config.json)"),
      ([f"--workdir={workdir}", f"--audio_dir={tmp_path}/nowhere", "--query=x"],
       f"--audio_dir={tmp_path}/nowhere: no such folder"),
      ([f"--workdir={workdir}", f"--audio_dir={recordings}"],
       "nothing to search for: give --query, --queries or --audio_query"),
      ([f"--workdir={workdir}", f"--audio_dir={recordings}", f"--queries={tmp_path}/q.txt"],
       f"--queries={tmp_path}/q.txt: no such file"),
      ([f"--workdir={workdir}", f"--audio_dir={recordings}", f"--queries={queries}",
        f"--json={queries}"],
       f"--json={queries} is the file --queries reads: give another file to write"),
      ([f"--workdir={workdir}", f"--audio_dir={recordings}", "--query=x",
        f"--json={workdir}/config.json"],
       f"--json={workdir}/config.json is the file --workdir reads: give another file to "
       "write"),
      ([f"--workdir={workdir}", f"--audio_dir={recordings}", "--query=x",
        f"--json={recordings}/found.json"],
       f"--json={recordings}/found.json is inside {recordings}, a data folder ntxr only "
       "reads: write it elsewhere"),
      ([f"--workdir={workdir}", f"--audio_dir={recordings}", "--query=a bell", "--query= "],
       "--query: a query is empty: give words to search for"),
      ([f"--workdir={workdir}", f"--audio_dir={recordings}", f"--queries={latin1}"],
       f"{latin1}:2: not UTF-8 text (byte 0xe9); save the file as UTF-8")]:
    mistaken = subprocess.run([sys.executable, "-m", "ntxr.search", *flags],
                              capture_output=True, text=True, check=False)
    assert (mistaken.returncode, mistaken.stderr) == (2, f"error: {culprit}\n")
  assert not os.path.exists(tmp_path / "none")
  assert queries.read_text(encoding="utf-8-sig") == "a bird sings\n\na bell rings\n"


def test_a_run_on_a_read_only_mount_is_searched_with_its_index_in_the_runs_cache(
    tiny_run, recordings, tmp_path):
  """The workdir reports itself unwritable, as a read-only mount does (emulated: root may
  write anywhere): the command still searches, writing nothing in it; the index, the
  compiled programs and the lock go to the run's cache, where the next search finds them."""
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_run, workdir)
  read_only = ("import os, runpy\n"
               "access = os.access\n"
               f"os.access = lambda path, mode, **options: (os.path.abspath(path) != {workdir!r}"
               " and access(path, mode, **options))\n"
               "runpy.run_module('ntxr.search', run_name='__main__', alter_sys=True)")
  before = snapshot(workdir)
  for _ in range(2):
    done = subprocess.run([sys.executable, "-c", read_only, f"--workdir={workdir}",
                           f"--audio_dir={recordings}", "--query=a bell rings"],
                          capture_output=True, text=True, check=False)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr[-3000:]
    assert "query: a bell rings" in done.stdout
  assert snapshot(workdir) == before
  kept = os.path.join(json.loads(open(os.path.join(workdir, "config.json")).read())["cache_dir"],
                      "search", hashlib.sha1(workdir.encode()).hexdigest()[:16])
  assert "12 files indexed" in done.stdout and "(0 embedded now" in done.stdout
  assert f"kept in {kept} ({workdir} is read-only)" in done.stdout
  folder_key = os.path.basename(os.path.dirname(search.index_path(workdir, recordings)))
  assert set(os.listdir(kept)) == {"compiled", "lock", folder_key}


def test_a_pooled_run_trains_and_searches_by_the_cosine_of_mean_embeddings(
    tiny_config, cache_dir, tmp_path):
  """--config.score=pooled through training and search: the index scores every clip of
  the test split against every caption as the cosine of their mean embeddings, computed
  here in NumPy from the split's embeddings."""
  workdir = str(tmp_path / "pooled")
  results = train.train_and_evaluate(tiny_config(score="pooled", num_epochs=1), workdir)
  assert results["score"] == "pooled" and 0 < results["t2a"]["mAP@10"] <= 1
  model = search.Model(workdir)
  split = model.experiment.evaluation.embed_split(model.state,
                                                 model.experiment.test_split)
  def unit_means(x, mask):
    means = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return means / np.linalg.norm(means, axis=1, keepdims=True)
  expected = (unit_means(split.audio.astype(np.float64), split.audio_mask)
              @ unit_means(split.text.astype(np.float64), split.text_mask).T)
  named = model.experiment.corpus.captions(model.experiment.test_split)
  index = search.Index.build(model, os.path.join(cache_dir, "synthetic_tiny", "evaluation"),
                             dtype=np.float32)
  captions = [caption for _, captions in named for caption in captions]
  found = index.scores(*model.embed_queries(captions), model.settings.loss.score)
  rows = [index.files.index(name) for name, _ in named]
  np.testing.assert_allclose(found[rows], expected, rtol=1e-5, atol=1e-6)
