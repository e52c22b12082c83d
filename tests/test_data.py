"""Data layer: the real Clotho CSV, the synthetic corpus, TFDS, tf.data and bad input."""

import csv
import os
import re
import shutil
import subprocess
import sys
import threading
from unittest import mock
import wave

import librosa
import numpy as np
import pytest

from ntxr import files, layouts, settings
from ntxr.configs import default
from ntxr.data import builders, captions, features, input_pipeline, synthetic, tokenizer
from ntxr.data import corpus as corpus_lib

DCASE2022 = os.path.join(os.path.dirname(__file__), "data", "dcase2022")
LOGMEL = settings.Features(sample_rate=synthetic.SAMPLE_RATE)
BUCKETS = default.get_config().frame_buckets


def test_real_clotho_evaluation_captions_parse():
  clips, skipped = captions.read_clotho_captions(
      os.path.join(DCASE2022, "clotho_evaluation_captions.csv"))
  assert not skipped
  assert len(clips) == 1045
  assert sum(len(c.captions) for c in clips) == 5225
  names = {c.file_name for c in clips}
  assert any("," in name for name in names)  # file names with commas
  assert sum("," in caption for c in clips for caption in c.captions) > 100  # quoted fields
  assert clips[0].file_name == "Santa Motor.wav"
  assert clips[0].captions[-1].startswith("While rhythmically punching or stamping,")


def test_clean_text():
  assert captions.clean_text("A dog's bark, then... SILENCE!") == "a dog s bark then silence"
  assert captions.clean_text_paper("A car_horn (loud) & rain-drops") == "a car horn loud rain-drops"


def write_csv(path, rows, header=captions.CLOTHO_COLUMNS):
  with open(path, "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows([header] + rows)


def test_malformed_captions_name_file_and_line(tmp_path):
  path = str(tmp_path / "caps.csv")
  write_csv(path, [["a.wav"] + ["a caption"] * 5, ["b.wav", "x", "", "y", "z", "w"]])
  with pytest.raises(ValueError, match=r"caps\.csv:3: empty caption for 'b\.wav'"):
    captions.read_clotho_captions(path)
  clips, skipped = captions.read_clotho_captions(path, skip=True)
  assert [c.file_name for c in clips] == ["a.wav"] and skipped == [(3, "empty caption for 'b.wav'")]
  write_csv(path, [["a.wav"] + ["a caption"] * 5, ["b.wav", "x", "...", "y", "z", "w"],
                   ["a.wav"] + ["another"] * 5])  # punctuation alone is no caption
  clips, skipped = captions.read_clotho_captions(path, skip=True)
  assert [c.file_name for c in clips] == ["a.wav"] and skipped == [
      (3, "empty caption for 'b.wav'"), (4, "duplicate file_name 'a.wav'")]
  write_csv(path, [["a.wav", "x"]], header=["file_name", "caption_1"])
  with pytest.raises(ValueError, match=r"caps\.csv:1: missing columns \['caption_2'"):
    captions.read_clotho_captions(path)
  with open(path, "wb") as f:
    f.write(b"file_name,caption_1\n\xff\xfe bad bytes\n")
  with pytest.raises(ValueError, match=r"caps\.csv:2: not UTF-8 text \(byte 0xff\)"):
    captions.read_clotho_captions(path)
  with pytest.raises(ValueError, match="caption file not found"):
    captions.read_clotho_captions(str(tmp_path / "missing.csv"))


GOOD_PAIRS = [["a.wav", "A dog barks.", "train"], ["b.wav", "Rain falls.", "val"],
              ["a.wav", "Barking.", "train"], ["c/d.wav", "A car.", "Test"]]  # any case


@pytest.mark.parametrize("row, reason", [
    (["b.wav", " ", "val"], "empty caption for 'b.wav'"),
    (["b.wav", "?!", "val"], "empty caption for 'b.wav'"),
    (["", "A caption.", "val"], "empty file_name"),
    (["/abs/e.wav", "A caption.", "val"], "file_name '/abs/e.wav' must be relative"),
    (["../e.wav", "A caption.", "val"], "file_name '../e.wav' must be relative"),
    (["c\\..\\..\\e.wav", "A caption.", "val"],  # Windows' separators
     "file_name 'c\\\\..\\\\..\\\\e.wav' must be relative"),
    (["e.wav", "A caption.", "holdout"], "unknown split 'holdout' for 'e.wav'"),
    (["a.wav", "Rain.", "test"], "'a.wav' is in split 'development' at line 2 and in "
     "'evaluation' here"),
    (["a.wav", "A dog barks.", "train"], "duplicate row: 'a.wav' with the same caption"),
])
def test_a_bad_pairs_row_is_named_by_line_or_skipped(tmp_path, row, reason):
  path = str(tmp_path / "captions.csv")
  write_csv(path, GOOD_PAIRS[:2] + [row] + GOOD_PAIRS[2:],
            header=["file_name", "caption", "split"])
  with pytest.raises(ValueError, match=re.escape(f"captions.csv:4: {reason}")):
    captions.read_pairs(path)
  pairs = captions.read_pairs(path, skip=True)
  [(line, said)] = pairs.skipped
  assert line == 4 and said.startswith(reason)
  assert {split: [(c.file_name, c.captions, c.line) for c in clips]
          for split, clips in pairs.clips.items()} == {
      "development": [("a.wav", ("A dog barks.", "Barking."), 2)],
      "validation": [("b.wav", ("Rain falls.",), 3)], "evaluation": [("c/d.wav", ("A car.",), 6)]}
  assert not pairs.assigned


def test_pairs_read_with_a_byte_order_mark_and_windows_line_endings(tmp_path):
  path = tmp_path / "captions.csv"
  path.write_bytes("\ufefffile_name,caption\r\nx.wav,A bell rings.\r\n".encode())
  with pytest.raises(ValueError, match=r"no clips in the validation, evaluation split"):
    captions.read_pairs(str(path))  # one file cannot fill three splits
  names = [f"clip {k}.wav" for k in range(20)]
  write_csv(str(path), [[n, f"Caption {k}."] for k, n in enumerate(names)],
            header=["file_name", "caption"])
  text = path.read_text(encoding="utf-8")
  path.write_bytes(("\ufeff" + text.replace("\n", "\r\n")).encode())
  pairs = captions.read_pairs(str(path))
  assert pairs.assigned and not pairs.skipped
  assigned = {c.file_name: split for split, clips in pairs.clips.items() for c in clips}
  assert sorted(assigned) == sorted(names)
  assert [list(assigned.values()).count(s) for s in layouts.SPLITS] == [14, 3, 3]
  assert captions.assign_splits(reversed(names)) == assigned  # order of rows does not matter
  assert captions.assign_splits(names, seed=1) != assigned
  ten = list(captions.assign_splits(names[:10]).values())  # 15% of 10 rounds to 2
  assert [ten.count(s) for s in layouts.SPLITS] == [6, 2, 2]


def test_audiocaps_captions_group_by_clip(tmp_path):
  path = str(tmp_path / "train.csv")
  write_csv(path, [["1", "abc", "30", "A dog barks."], ["2", "abc", "30", "Barking."],
                   ["3", "xyz", "0", "Rain falls."], ["4", "bad", "x", "Oops."]],
            header=captions.AUDIOCAPS_COLUMNS)
  with pytest.raises(ValueError, match=r"train\.csv:5: bad youtube_id or start_time"):
    captions.read_audiocaps_captions(path)
  clips, skipped = captions.read_audiocaps_captions(path, skip=True)
  assert [(c.file_name, c.captions, c.line) for c in clips] == [  # a clip's first line
      ("abc_30", ("A dog barks.", "Barking."), 2), ("xyz_0", ("Rain falls.",), 4)]
  assert skipped == [(5, "bad youtube_id or start_time")]


def write_wav(path, samples, rate=16000):
  with wave.open(str(path), "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes(np.asarray(samples, "<i2").tobytes())


def test_bad_audio_names_the_file(tmp_path):
  write_wav(tmp_path / "empty.wav", [])
  write_wav(tmp_path / "silent.wav", np.zeros(1600))
  (tmp_path / "corrupt.wav").write_bytes(b"RIFF not really a wav file")
  for name, message in [("empty.wav", "empty audio"), ("silent.wav", "silent audio"),
                        ("corrupt.wav", "cannot decode"), ("gone.wav", "not found")]:
    with pytest.raises(ValueError, match=message) as error:
      features.decode_audio(str(tmp_path / name), 16000)
    assert name in str(error.value)


def test_log_mel_frames_follow_the_hop(tmp_path):
  write_wav(tmp_path / "a.wav", (np.sin(np.arange(32000) / 5) * 9000), rate=32000)
  mel = features.clip_features(str(tmp_path / "a.wav"), LOGMEL)  # resampled to 16 kHz
  assert mel.shape == (1 + 16000 // 320, 64) and np.all(np.isfinite(mel))


def test_synthetic_clips_are_deterministic_and_captioned():
  first, texts = synthetic.make_clip(0, 0, 3)
  assert synthetic.make_clip(0, 0, 3) == (first, texts)
  assert synthetic.make_clip(1, 0, 3)[0] != first
  assert len(synthetic.EVENT_KINDS) >= 12
  for index in range(40):
    _, texts = synthetic.make_clip(0, 1, index)
    assert len(texts) == 5
    assert all(8 <= len(c.split()) <= 20 for c in texts), texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synthetic") / "clotho")
  return synthetic.generate(root, "tiny", processes=2)


def test_synthetic_corpus_layout_and_cache(corpus, tmp_path):
  for split, count in zip(layouts.SPLITS, synthetic.SIZES["tiny"]):
    clips, _ = captions.read_clotho_captions(os.path.join(corpus, f"clotho_captions_{split}.csv"))
    assert len(clips) == count
    assert all(os.path.exists(os.path.join(corpus, split, c.file_name)) for c in clips)
  assert synthetic.is_complete(corpus, "tiny", 0)
  copy = str(tmp_path / "copy")
  synthetic.generate(copy, "tiny", processes=1)
  for split in layouts.SPLITS:
    name = f"clotho_captions_{split}.csv"
    assert open(os.path.join(copy, name)).read() == open(os.path.join(corpus, name)).read()
  os.remove(os.path.join(copy, synthetic.MANIFEST))  # an interrupted corpus
  os.remove(os.path.join(copy, "development", "dev_00000.wav"))
  assert not synthetic.is_complete(copy, "tiny", 0)
  # What a killed process left (its pid gone), and what a live one is writing.
  with subprocess.Popen([sys.executable, "-c", "pass"]) as gone:
    gone.wait()
  os.makedirs(f"{copy}.partial-{gone.pid}/development")
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    os.makedirs(f"{copy}.partial-{live.pid}")
    synthetic.generate(copy, "tiny", processes=1)
    assert os.path.exists(os.path.join(copy, "development", "dev_00000.wav"))
    assert [p for p in os.listdir(tmp_path) if ".partial-" in p] == [
        f"copy.partial-{live.pid}"]
  finally:
    live.kill()
    live.wait()


def test_a_source_being_prepared_holds_up_only_its_own_runs(tiny_config, monkeypatch):
  """A run takes one lock, its source's: while another process generates or prepares that
  source, the run waits for it, and a source prepared elsewhere in the cache holds up
  nothing."""
  data = settings.Settings.of(tiny_config()).data
  corpus_lib.load_data(data)  # prepared before the test holds the lock
  own = os.path.join(data.cache_dir, corpus_lib.LOCKS, f"synthetic_{data.size}")
  locked, taken = files.locked, []
  monkeypatch.setattr(files, "locked", lambda path, **how: taken.append(path) or locked(
      path, **how))
  released, opened = threading.Event(), []
  def open_corpus():
    corpus_lib.load_data(data)
    opened.append(released.is_set())
  with locked(own, wait=True):  # as another process preparing the source
    run = threading.Thread(target=open_corpus)
    run.start()
    run.join(timeout=3)
    released.set()
  run.join()
  assert opened == [True] and taken == [own]


def test_a_corpus_of_clothos_shape_has_15_to_30_second_clips(tmp_path, monkeypatch):
  monkeypatch.setitem(synthetic.SIZES, "clotho", (3, 2, 2))  # Clotho's clips, fewer of them
  config = default.get_config()
  config.update(size="clotho", cache_dir=str(tmp_path), tokens="words")
  prepared = corpus_lib.load_data(settings.Settings.of(config).data)
  assert synthetic.is_complete(str(tmp_path / "synthetic_clotho"), "clotho", 0)
  for split, count in zip(prepared.splits, (3, 2, 2)):
    clips = list(prepared.builder.as_dataset(split=split).as_numpy_iterator())
    assert len(clips) == count
    for clip in clips:  # a frame every 20 ms, one more at the end
      assert 15 * 50 + 1 <= len(clip["logmel"]) <= 30 * 50 + 1, len(clip["logmel"])


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
  builder = builders.NtxrClotho(data_dir=str(tmp_path_factory.mktemp("tfds")),
                                config=builders.clotho_config(LOGMEL), processes=2)
  builders.prepare(builder, corpus)
  assert builders.skipped(builder) == {split: [] for split in layouts.SPLITS}
  development, _ = captions.read_clotho_captions(
      os.path.join(corpus, "clotho_captions_development.csv"))
  model = tokenizer.train([c for clip in development for c in clip.captions],
                          str(tmp_path_factory.mktemp("spm") / "spm.model"), vocab_size=100)
  return builder, tokenizer.Tokenizer(model)


def test_prepared_clips_hold_features_and_captions(corpus, prepared):
  builder, _ = prepared
  examples = list(builder.as_dataset(split="validation").as_numpy_iterator())
  assert len(examples) == synthetic.SIZES["tiny"][1]
  example = next(e for e in examples if e["file_name"] == b"val_00002.wav")
  with wave.open(os.path.join(corpus, "validation", "val_00002.wav")) as w:
    assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (16000, 2, 1)
    samples = np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32768.0
  # By hand: 40 ms periodic Hann frames every 20 ms around centres padded with zeros, the
  # power spectrum through 64 mel filters (0 Hz to Nyquist), log(x + 1e-8), frames first.
  window, hop = 640, 320
  padded = np.pad(samples, window // 2)
  frames = np.stack([padded[i:i + window] for i in range(0, len(padded) - window + 1, hop)])
  hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(window) / window)
  power = np.abs(np.fft.rfft(frames * hann, axis=1)) ** 2
  expected = np.log(power @ librosa.filters.mel(sr=16000, n_fft=window, n_mels=64).T + 1e-8)
  assert example["logmel"].dtype == np.float32 and example["logmel"].shape == expected.shape
  np.testing.assert_allclose(example["logmel"], expected, atol=1e-3)
  assert len(example["captions"]) == 5


def test_a_corpus_reads_each_splits_captions_once(corpus, prepared):
  """An Experiment asks for the training split's caption count every epoch: the corpus
  reads the split's records once and answers from that after."""
  builder, tok = prepared
  prepared_corpus = corpus_lib.Corpus(builder, tok, skipped={}, generate_s=0, prepare_s=0)
  reads = []
  as_dataset = builder.as_dataset
  with mock.patch.object(builder, "as_dataset",
                         lambda **kw: reads.append(kw["split"]) or as_dataset(**kw)):
    first = prepared_corpus.captions("validation")
    assert prepared_corpus.captions("validation") == first and reads == ["validation"]
  expected, _ = captions.read_clotho_captions(
      os.path.join(corpus, "clotho_captions_validation.csv"))
  assert sorted(first) == sorted((clip.file_name, list(clip.captions)) for clip in expected)


def test_train_batches_masks_and_determinism(prepared):
  builder, tok = prepared
  clips = builder.as_dataset(split="development")
  lengths = {int(e["audio_id"]): len(e["logmel"]) for e in clips.as_numpy_iterator()}
  batches = lambda seed: list(input_pipeline.as_numpy(input_pipeline.train_batches(
      clips, tok, batch_size=8, seed=seed, frame_buckets=BUCKETS, max_tokens=32)))
  first = batches(0)
  assert len(first) == synthetic.SIZES["tiny"][0] * 5 // 8
  for b in first:
    assert b["audio"].shape[1] in BUCKETS
    np.testing.assert_array_equal(b["audio_mask"].sum(1), [lengths[i] for i in b["audio_id"]])
    assert np.all(b["audio"][~b["audio_mask"]] == 0)
    np.testing.assert_array_equal(b["token_mask"], b["tokens"] != tokenizer.PAD_ID)
    assert np.all(b["token_mask"].sum(1) > 0)
  for a, b in zip(first, batches(0)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert any((a["audio_id"] != b["audio_id"]).any() for a, b in zip(first, batches(1)))


def test_evaluation_iterates_every_clip_and_caption_once(prepared):
  builder, tok = prepared
  clips = builder.as_dataset(split="evaluation")
  audio_ids = np.concatenate([b["audio_id"] for b in input_pipeline.as_numpy(
      input_pipeline.clip_batches(clips, batch_size=3, frame_buckets=BUCKETS))])
  caption_ids = np.concatenate([b["audio_id"] for b in input_pipeline.as_numpy(
      input_pipeline.caption_batches(clips, tok, batch_size=7, max_tokens=32))])
  assert sorted(audio_ids) == list(range(synthetic.SIZES["tiny"][2]))
  assert sorted(caption_ids) == sorted(list(range(synthetic.SIZES["tiny"][2])) * 5)


def test_missing_wav_fails_cleanly_or_is_skipped(corpus, tmp_path):
  broken = str(tmp_path / "broken")
  shutil.copytree(corpus, broken)
  os.remove(os.path.join(broken, "evaluation", "eva_00004.wav"))
  config = builders.clotho_config(LOGMEL)
  builder = builders.NtxrClotho(data_dir=str(tmp_path / "tfds"), config=config, processes=1)
  with pytest.raises(ValueError, match=r"eva_00004\.wav: audio file not found \(named at "
                     r".*clotho_captions_evaluation\.csv:6\)"):
    builders.prepare(builder, broken)
  final = os.path.join(str(tmp_path / "tfds"), "ntxr_clotho", config.name, "1.0.0")
  assert not os.path.exists(final)  # nothing half-written that a later run would trust
  builder = builders.NtxrClotho(data_dir=str(tmp_path / "tfds"), config=config,
                                processes=1, skip_bad_files=True)
  builders.prepare(builder, broken)
  skipped = builders.skipped(builder)["evaluation"]
  assert len(skipped) == 1 and re.fullmatch(
      r".*clotho_captions_evaluation\.csv:6: .*eva_00004\.wav: audio file not found", skipped[0])
  reopened = builders.NtxrClotho(data_dir=str(tmp_path / "tfds"), config=config)
  assert builders.skipped(reopened)["evaluation"] == skipped  # recorded with the data
  assert len(list(builder.as_dataset(split="evaluation"))) == synthetic.SIZES["tiny"][2] - 1
  with pytest.raises(ValueError, match="no such folder"):
    builders.prepare(builder, str(tmp_path / "nowhere"))
