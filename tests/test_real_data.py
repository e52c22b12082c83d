"""Real recordings (tests/data/recordings) through every path a user takes with real data.

Clotho layout at the default 44.1 kHz: wav, flac, mp3 and ogg; 16, 44.1, 48 and 96 kHz
sources; stereo down-mixed; a 50 ms clip and a 30 s one; names with spaces, commas and
non-ASCII letters. The data folder is never written to. The paper's config runs on it
with a word2vec file, and refuses to run without one. An AudioCaps folder and a folder of
your own pairs (captions.csv) are reached from the same entry point.
"""

import csv
import json
import logging
import os
import shutil
import subprocess
import sys

import librosa
import numpy as np
import pytest
import soundfile

import recordings
from runs import experiment_of
from ntxr import dcase, settings, train
from ntxr.configs import paper
from ntxr.data import builders, captions, corpus, features, tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_MODEL = dict(channels=(4, 8, 8, 8, 8), embed_dim=16, batch_size=8, eval_batch_size=8,
                   num_epochs=1, checkpoint_every_steps=2, frame_buckets=(480,))


@pytest.fixture(scope="module")
def real_clotho(tmp_path_factory):
  return recordings.clotho_folder(str(tmp_path_factory.mktemp("real") / "Clotho"))


@pytest.fixture(scope="module")
def prepared(real_clotho, cache_dir):
  """The real folder prepared at the default 44.1 kHz, with the folder's snapshot before."""
  before = recordings.snapshot(real_clotho)
  return corpus.load(real_clotho, cache_dir=cache_dir), before


def examples(prepared_corpus, split):
  return {c["file_name"].decode(): c for c in
          prepared_corpus.builder.as_dataset(split=split).as_numpy_iterator()}


def test_real_recordings_prepare_at_44k_without_writing_into_the_data_folder(
    prepared, real_clotho):
  prepared_corpus, before = prepared
  assert recordings.snapshot(real_clotho) == before
  assert prepared_corpus.builder.builder_config.logmel.sample_rate == 44100
  assert not any(prepared_corpus.skipped.values())
  for split, names in recordings.SPLITS.items():
    assert sorted(examples(prepared_corpus, split)) == sorted(names)
  evaluation = examples(prepared_corpus, "evaluation")
  assert evaluation[recordings.LONG]["logmel"].shape == (1501, 64)  # 30 s at a 20 ms hop
  assert evaluation[recordings.SHORT]["logmel"].shape == (3, 64)  # 50 ms: under one pool
  assert list(evaluation["xylofón.mp3"]["captions"])[0].decode().startswith("A xylophone")


@pytest.mark.parametrize("name", ["alarm clock.ogg", "camera shutter.flac", "front center.wav",
                                  "canário.mp3"])
def test_features_downmix_and_resample_like_an_independent_librosa_path(prepared, name):
  prepared_corpus, _ = prepared
  split = next(s for s, names in recordings.SPLITS.items() if name in names)
  stored = examples(prepared_corpus, split)[name]["logmel"]
  path = os.path.join(recordings.RECORDINGS, name)
  audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
  mono = librosa.resample(audio.mean(axis=1), orig_sr=rate, target_sr=44100)
  mel = librosa.feature.melspectrogram(y=mono, sr=44100, n_fft=1764, hop_length=882,
                                       n_mels=64)
  np.testing.assert_allclose(stored, np.log(mel + 1e-8).T, atol=1e-3)


def test_paper_features_are_the_authors_log_mel(tmp_path):
  config = paper.get_config()
  logmel = settings.Features(sample_rate=config.sample_rate, n_fft=config.n_fft,
                                 f_min=config.f_min, f_max=config.f_max,
                                 log_offset=config.log_offset)
  path = os.path.join(recordings.RECORDINGS, "electric piano.flac")  # 44.1 kHz, as Clotho
  y, sr = librosa.load(path, sr=None, mono=True)  # their audio_logmel.py, line by line
  theirs = np.log(librosa.feature.melspectrogram(
      y=y, sr=sr, n_fft=2048, hop_length=882, win_length=1764, n_mels=64, fmin=12.0,
      fmax=8000) + np.spacing(1)).T
  np.testing.assert_allclose(features.clip_features(path, logmel), theirs, rtol=1e-4, atol=1e-4)
  assert logmel.name == "sr44100_win40_hop20_fft2048_mel64_f12-8000_off2p22045e-16"


def test_a_bad_real_file_names_its_file_line_and_the_flag(real_clotho, tmp_path):
  broken = str(tmp_path / "broken")
  shutil.copytree(real_clotho, broken)
  with open(os.path.join(broken, "validation", "violoncello.flac"), "r+b") as f:
    f.truncate(200)  # a download cut short
  config = builders.clotho_config(settings.Features(sample_rate=44100))
  builder = builders.NtxrClotho(data_dir=str(tmp_path / "tfds"), config=config, processes=1)
  with pytest.raises(ValueError, match=r"violoncello\.flac: cannot decode audio .*\(named at "
                     r".*clotho_captions_validation\.csv:3\); pass "
                     r"--config\.skip_bad_files=true"):
    builders.prepare(builder, broken)


def test_an_mp3_cut_short_and_a_clip_shorter_than_one_fft_are_named_or_counted(
    real_clotho, tmp_path, capfd):
  """Not decoded and trained on with a decoder's or librosa's warning that names no file:
  named with their caption line, or with --config.skip_bad_files left out and counted."""
  broken = str(tmp_path / "broken")
  shutil.copytree(real_clotho, broken)
  trumpet = os.path.join(broken, "development", "trumpet.mp3")
  with open(trumpet, "r+b") as f:
    f.truncate(os.path.getsize(trumpet) // 2)  # a download cut short
  glass, rate = soundfile.read(os.path.join(recordings.RECORDINGS, "glass of water.wav"))
  soundfile.write(os.path.join(broken, "development", "piano.wav"), glass[:rate // 100] + 0.1,
                  rate)  # 10 ms
  config = builders.clotho_config(settings.Features(sample_rate=44100))
  builder = builders.NtxrClotho(data_dir=str(tmp_path / "tfds"), config=config, processes=1)
  with pytest.raises(ValueError, match=r"trumpet\.mp3: cut short: \d+ of the 28768 samples its "
                     r"header declares decode .*clotho_captions_development\.csv:6\); pass "
                     r"--config\.skip_bad_files=true"):
    builders.prepare(builder, broken)
  builder = builders.NtxrClotho(data_dir=str(tmp_path / "skipping"), config=config,
                                processes=1, skip_bad_files=True)
  builders.prepare(builder, broken)
  left_out = builders.skipped(builder)["development"]
  assert [entry.split(": ", 2)[:2] for entry in left_out] == [
      [f"{broken}/clotho_captions_development.csv:6", f"{trumpet}"],
      [f"{broken}/clotho_captions_development.csv:8", f"{broken}/development/piano.wav"]]
  assert left_out[1].endswith("too short (10 ms): its features need at least 40 ms (one "
                              "1764-sample FFT)")
  err = capfd.readouterr().err
  assert "Xing" not in err and "n_fft" not in err


def run_main(*flags):
  return subprocess.run([sys.executable, "-m", "ntxr.main", *flags], capture_output=True,
                        text=True, cwd=ROOT, timeout=900)


def test_main_on_real_recordings_records_and_reports_skipped_clips(real_clotho, tmp_path,
                                                                   cache_dir):
  data = str(tmp_path / "Clotho with a bad clip")
  shutil.copytree(real_clotho, data)
  with open(os.path.join(data, "development", "piano.wav"), "wb") as f:
    f.write(b"RIFF....WAVEnot audio")
  tau = str(tmp_path / "tau_relevances")
  recordings.judged_by_people(data, tau)
  before = recordings.snapshot(data)
  workdir = str(tmp_path / "run")
  flags = [f"--config.data_dir={data}", "--strategy=semihard_cross", f"--workdir={workdir}",
           f"--config.cache_dir={cache_dir}", "--config.skip_bad_files=true",
           f"--config.graded_relevance_dir={tau}",
           *[f"--config.{k}={v}" for k, v in SMALL_MODEL.items()]]
  first = run_main(*flags)
  assert first.returncode == 0, first.stderr[-3000:]
  results = json.loads(open(os.path.join(workdir, "results.json")).read())
  # The relevance file beside the captions and the TAU ratings score the test split; the
  # run's 2025 score matrix, scored by ntxr.dcase, gives the same numbers.
  assert (results["t2a_multi"]["queries"], results["t2a_graded"]["queries"]) == (20, 2)
  assert results["judged_against"] == dict(t2a_multi=os.path.join(data, "metadata_eval.csv"),
                                           t2a_graded=tau)
  matrix = os.path.join(workdir, "dcase2025_evaluation.csv")
  assert dcase.score_2025(f"{data}/metadata_eval.csv", matrix) == pytest.approx(
      results["t2a_multi"], abs=1e-12)
  assert dcase.score_graded(tau, "evaluation", matrix) == pytest.approx(
      results["t2a_graded"], abs=1e-12)
  assert "t2a_multi" in first.stdout and "against people's ratings: nDCG@10" in first.stdout
  assert results["skipped"]["count"] == 1
  assert "clotho_captions_development.csv:8: " in results["skipped"]["entries"][0]
  assert "piano.wav" in results["skipped"]["entries"][0]
  assert "1 clips or rows left out" in first.stdout and "piano.wav" in first.stdout
  assert recordings.snapshot(data) == before  # no tokenizer, cache or lock in the data folder
  again = run_main(*flags, "--eval_only")  # the data is prepared: the skip is still reported
  assert again.returncode == 0, again.stderr[-3000:]
  assert "piano.wav" in again.stdout and "piano.wav" in again.stderr


def write_word2vec(path, words, dim, seed=0):
  vectors = np.random.default_rng(seed).normal(size=(len(words), dim))
  lines = [f"{len(words)} {dim}"] + [w + " " + " ".join(f"{x:.5f}" for x in v)
                                      for w, v in zip(words, vectors)]
  open(path, "w", encoding="utf-8").write("\n".join(lines) + "\n")


def test_paper_config_needs_word_vectors_or_an_explicit_opt_out(real_clotho, tmp_path):
  config = paper.get_config()
  config.data_dir = real_clotho
  with pytest.raises(ValueError, match=r"pass --config\.word_vectors=/path/to/GoogleNews-"
                     r"vectors-negative300\.bin .* or --config\.require_word_vectors=false"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")  # nothing written that a fixed rerun would refuse


def test_paper_config_trains_on_real_recordings_with_word2vec(real_clotho, cache_dir, tmp_path):
  words = sorted({w for split in recordings.SPLITS.values() for name in split
                  for c in recordings.CAPTIONS[name] for w in captions.clean_text_paper(c).split()})
  vectors = str(tmp_path / "vectors.txt")
  write_word2vec(vectors, [w for w in words if w not in ("xylophone", "clavichord")], 16)
  config = paper.get_config()
  config.update(dict(SMALL_MODEL, data_dir=real_clotho, cache_dir=cache_dir,
                     word_vectors=vectors))
  experiment = experiment_of(config)
  vocabulary = experiment.corpus.tokenizer.words
  assert "xylophone" in vocabulary  # an evaluation-only word is in the paper's vocabulary
  table = experiment.initial_state.params["text"]["embed"]["embedding"]
  np.testing.assert_array_equal(table[vocabulary.index("xylophone")],
                                table[vocabulary.index("clavichord")])  # one shared UNK
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["selected_by"] == "validation_loss" and results["epochs"] == 1
  assert results["split"] == "evaluation" and np.isfinite(results["t2a"]["mAP"])


def test_audiocaps_folder_is_reached_from_the_same_entry_point(tmp_path, cache_dir, tiny_config):
  folder = recordings.audiocaps_folder(str(tmp_path / "AudioCaps"))
  before = recordings.snapshot(folder)
  loaded = corpus.load(folder, cache_dir=cache_dir, vocab_size=60)
  assert isinstance(loaded.builder, builders.NtxrAudiocaps)
  assert loaded.splits == ("train", "val", "test")
  clips = list(loaded.builder.as_dataset(split="val").as_numpy_iterator())
  assert sorted(c["file_name"].decode() for c in clips) == ["ytval00_30", "ytval01_30",
                                                            "ytval02_30"]
  assert all(len(c["captions"]) == 5 and c["logmel"].shape[1] == 64 for c in clips)
  assert recordings.snapshot(folder) == before
  with pytest.raises(ValueError, match="not a Clotho v2, AudioCaps or pairs folder"):
    corpus.load(str(tmp_path), cache_dir=cache_dir)
  tok = loaded.tokenizer
  assert isinstance(tok, tokenizer.Tokenizer) and len(tok.encode("A canary sings.")) > 0
  results = train.train_and_evaluate(  # 35 caption pairs: 4 batches, cut to 3
      tiny_config(data_dir=folder, num_epochs=1, max_steps_per_epoch=3), str(tmp_path / "run"))
  assert results["split"] == "test" and results["steps"] == 3 and results["epochs"] == 1


def test_your_own_pairs_keep_their_splits_and_every_caption(tmp_path, cache_dir):
  folder = recordings.pairs_folder(str(tmp_path / "my sounds"))
  before = recordings.snapshot(folder)
  loaded = corpus.load(folder, cache_dir=cache_dir, vocab_size=60)
  assert isinstance(loaded.builder, builders.NtxrPairs)
  assert loaded.splits == ("development", "validation", "evaluation")
  with open(os.path.join(folder, "captions.csv"), encoding="utf-8-sig") as f:
    rows = list(csv.DictReader(f))
  counts = set()
  for split, alias in (("development", "train"), ("validation", "val"), ("evaluation", "test")):
    expected = {}
    for row in rows:
      if row["split"] == alias:
        expected.setdefault(row["file_name"], []).append(row["caption"])
    clips = {c["file_name"].decode(): [t.decode() for t in c["captions"]]
             for c in loaded.builder.as_dataset(split=split).as_numpy_iterator()}
    assert clips == expected  # every caption, in the file's order, nested paths kept
    counts.update(len(texts) for texts in expected.values())
  assert counts == {1, 2, 3, 4, 5}  # one to five captions a file
  assert recordings.snapshot(folder) == before
  assert not os.path.exists(os.path.join(corpus._prepared_dir(cache_dir, folder),
                                         corpus.SPLITS_FILE))  # nothing assigned


def test_your_own_pairs_without_a_split_column_are_split_recorded_and_trained(
    tmp_path, cache_dir, tiny_config, caplog):
  folder = recordings.pairs_folder(str(tmp_path / "my sounds"), split_column=False)
  before = recordings.snapshot(folder)
  config = tiny_config(**{**SMALL_MODEL, "batch_size": 2}, data_dir=folder)
  with caplog.at_level(logging.WARNING):
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["split"] == "evaluation" and np.isfinite(results["t2a"]["mAP"])
  assert recordings.snapshot(folder) == before
  recorded = os.path.join(corpus._prepared_dir(cache_dir, folder), corpus.SPLITS_FILE)
  assert ("its files were split 8 development, 2 validation, 2 evaluation (seed 0); the "
          f"split is recorded in {recorded}") in caplog.text
  with open(recorded) as f:
    splits = {row["file_name"]: row["split"] for row in csv.DictReader(f)}
  assert len(splits) == 12 and list(splits.values()).count("development") == 8
  loaded = corpus.load(folder, cache_dir=cache_dir, vocab_size=config.vocab_size)
  for split in loaded.splits:
    assert sorted(examples(loaded, split)) == sorted(n for n, s in splits.items() if s == split)


def test_a_bad_pairs_row_names_its_line_or_is_a_counted_skip(tmp_path, cache_dir):
  folder = recordings.pairs_folder(str(tmp_path / "pairs"))
  with open(os.path.join(folder, "captions.csv"), "a", newline="", encoding="utf-8") as f:
    csv.writer(f).writerow(["piano.wav", "  ", "train"])
  with open(os.path.join(folder, "captions.csv"), encoding="utf-8-sig") as f:
    line = len(f.read().splitlines())
  with pytest.raises(ValueError, match=f"captions.csv:{line}: empty caption for 'piano.wav'"):
    corpus.load(folder, cache_dir=cache_dir, vocab_size=60)
  loaded = corpus.load(folder, cache_dir=cache_dir, vocab_size=60, skip_bad_files=True)
  assert [entry.split("captions.csv:")[1] for entry in loaded.skipped["development"]] == [
      f"{line}: empty caption for 'piano.wav'"]


def test_a_missing_pairs_file_names_its_csv_line(tmp_path, cache_dir):
  folder = recordings.pairs_folder(str(tmp_path / "pairs"))
  os.remove(os.path.join(folder, "val", "nested", "violoncello.flac"))
  with pytest.raises(ValueError, match=r"violoncello\.flac.*\(named at .*captions\.csv:\d+\)"):
    corpus.load(folder, cache_dir=cache_dir, vocab_size=60)
