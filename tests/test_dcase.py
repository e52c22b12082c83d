"""The DCASE scorer on the real DCASE 2022 files in tests/data/dcase2022, and its errors."""

import csv
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ntxr import ctrl_c, dcase
from processes import ctrl_c_while_reading

DCASE2022 = os.path.join(os.path.dirname(__file__), "data", "dcase2022")
GROUND_TRUTH = os.path.join(DCASE2022, "clotho_evaluation_captions.csv")
BASELINE = os.path.join(DCASE2022, "baseline_top10.csv")


def test_baseline_submission_gets_the_published_scores(tmp_path):
  output = tmp_path / "scores.json"
  run = subprocess.run([sys.executable, "-m", "ntxr.dcase", f"--ground_truth={GROUND_TRUTH}",
                        f"--predictions={BASELINE}", f"--output_json={output}"],
                       capture_output=True, text=True, check=True)
  result = json.loads(output.read_text())
  assert {k: round(v, 2) for k, v in result.items()} == {
      "R@1": 0.03, "R@5": 0.11, "R@10": 0.19, "mAP@10": 0.07}
  assert "R@10 0.1883" in run.stdout


def write_ground_truth(path, files=12):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["file_name"] + [f"caption_{k}" for k in range(1, 3)])
    writer.writerows([f"f{i}.wav", f"cap {i} a", f"cap {i} b"] for i in range(files))


def test_written_submission_scores_as_planted(tmp_path):
  write_ground_truth(tmp_path / "gt.csv")
  captions = [f"cap {i} {v}" for i in range(12) for v in "ab"]
  files = [f"f{i}.wav" for i in range(12)]
  # Caption of file i ranks file (i + 1) % 12 first and its own file second, except
  # the captions of files 0-2, which rank their own file first.
  s = np.zeros((24, 12))
  for row, caption in enumerate(captions):
    own = int(caption.split()[1])
    s[row, (own + 1) % 12] = 1.0
    s[row, own] = 2.0 if own < 3 else 0.5
  dcase.write_submission(str(tmp_path / "sub.csv"), captions, files, s)
  result = dcase.score_files(str(tmp_path / "gt.csv"), str(tmp_path / "sub.csv"))
  assert result == pytest.approx({"R@1": 6 / 24, "R@5": 1.0, "R@10": 1.0,
                                  "mAP@10": (6 * 1 + 18 * 0.5) / 24})


def _planted(tmp_path, scores, captions=None) -> dict:
  """score_files of the submission written from scores [24, 12] of the ground truth's
  captions (default: write_ground_truth's) against its 12 files."""
  captions = captions or [f"cap {i} {v}" for i in range(12) for v in "ab"]
  dcase.write_submission(str(tmp_path / "sub.csv"), captions,
                         [f"f{i}.wav" for i in range(12)], scores)
  return dcase.score_files(str(tmp_path / "gt.csv"), str(tmp_path / "sub.csv"))


def test_a_file_at_rank_ten_counts_a_tenth_in_map_at_10(tmp_path):
  write_ground_truth(tmp_path / "gt.csv")
  result = _planted(tmp_path, -np.tile(np.arange(12.0), (24, 1)))  # f0..f9 for every caption
  assert result == pytest.approx({"R@1": 2 / 24, "R@5": 10 / 24, "R@10": 20 / 24,
                                  "mAP@10": 2 * sum(1 / r for r in range(1, 11)) / 24})


def test_tied_scores_list_the_lower_file_index_first(tmp_path):
  """Each caption's own file ties with the next file: listed first, except for f11's two
  captions, whose tie is with f0."""
  write_ground_truth(tmp_path / "gt.csv")
  scores = np.zeros((24, 12))
  for row in range(24):
    scores[row, row // 2] = scores[row, (row // 2 + 1) % 12] = 1
  assert _planted(tmp_path, scores) == pytest.approx(
      {"R@1": 22 / 24, "R@5": 1.0, "R@10": 1.0, "mAP@10": 23 / 24})


def test_a_caption_text_in_two_rows_is_the_last_rows(tmp_path):
  """As the challenge's script reads the ground truth: f1's first caption repeats f0's,
  so that text's one relevant file is f1, which its submission row (the first of the
  text's, f0's) lists second; the other 22 texts' files are first."""
  write_ground_truth(tmp_path / "gt.csv")
  rows = (tmp_path / "gt.csv").read_text().splitlines()
  rows[2] = rows[2].replace("cap 1 a", "cap 0 a")
  (tmp_path / "gt.csv").write_text("\n".join(rows) + "\n")
  captions = [c for i in range(12) for c in ("cap 0 a" if i == 1 else f"cap {i} a",
                                              f"cap {i} b")]
  scores = np.zeros((24, 12))
  for row in range(24):
    scores[row, row // 2], scores[row, (row // 2 + 1) % 12] = 2, 1
  assert _planted(tmp_path, scores, captions) == pytest.approx(
      {"R@1": 22 / 23, "R@5": 1.0, "R@10": 1.0, "mAP@10": 22.5 / 23})


def test_a_score_matrix_keeps_its_float32_scores_exactly(tmp_path):
  """Two float32 scores that agree to six digits keep their order through the file."""
  (tmp_path / "matches.csv").write_text(
      'query,audio_filenames\nq,"[\'y.wav\']"\nr,"[\'x.wav\']"\n')
  a, b = 0.1234561, 0.1234564
  dcase.write_score_matrix(str(tmp_path / "scores.csv"), ["q", "r"], ["x.wav", "y.wav"],
                           np.array([[a, b], [b, a]], np.float32))
  assert dcase.score_2025(str(tmp_path / "matches.csv"),
                          str(tmp_path / "scores.csv"))["mAP@16"] == 1.0


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows[1].__setitem__(0, "no such caption"),
     ":2: unknown caption 'no such caption'"),
    (lambda rows: rows[2].__setitem__(3, "ghost.wav"), ":3: unknown file 'ghost.wav'"),
    (lambda rows: rows[3].__setitem__(10, ""), ":4: expected a caption and 10 file names"),
    (lambda rows: rows.pop(), "1 ground-truth captions have no row"),
    (lambda rows: rows[0].__setitem__(0, "text"), ":1: expected the header"),
    (lambda rows: rows.insert(6, list(rows[2])), ":7: caption 'cap 0 b' is given twice "
     "(first at line 3)"),
    (lambda rows: rows[4].pop(), ":5: expected a caption and 10 file names"),
    (lambda rows: rows.clear(), ":1: expected the header"),
])
def test_bad_submissions_name_file_and_line(tmp_path, edit, message):
  write_ground_truth(tmp_path / "gt.csv")
  captions = [f"cap {i} {v}" for i in range(12) for v in "ab"]
  dcase.write_submission(str(tmp_path / "sub.csv"), captions,
                         [f"f{i}.wav" for i in range(12)], np.zeros((24, 12)))
  with open(tmp_path / "sub.csv", newline="") as f:
    rows = list(csv.reader(f))
  edit(rows)
  with open(tmp_path / "sub.csv", "w", newline="") as f:
    csv.writer(f).writerows(rows)
  with pytest.raises(ValueError, match=re.escape(message)):
    dcase.score_files(str(tmp_path / "gt.csv"), str(tmp_path / "sub.csv"))


def test_a_spreadsheet_saved_submission_scores_as_written(tmp_path):
  """With a byte-order mark and Windows line endings, as spreadsheets save "CSV UTF-8"."""
  saved = tmp_path / "saved.csv"
  with open(BASELINE, encoding="utf-8") as f:
    saved.write_bytes(("\ufeff" + f.read()).replace("\n", "\r\n").encode("utf-8"))
  assert dcase.score_files(GROUND_TRUTH, str(saved)) == dcase.score_files(GROUND_TRUTH, BASELINE)


def test_a_file_not_in_utf8_names_the_line_of_its_first_bad_byte(tmp_path):
  write_ground_truth(tmp_path / "gt.csv")
  text = (tmp_path / "gt.csv").read_bytes().split(b"\n")
  text[3] = text[3].replace(b"cap", "cäp".encode("latin-1"), 1)
  (tmp_path / "gt.csv").write_bytes(b"\n".join(text))
  with pytest.raises(ValueError, match=r"gt\.csv:4: not UTF-8 text \(byte 0xe4\)"):
    dcase.score_files(str(tmp_path / "gt.csv"), BASELINE)


def test_the_command_says_what_is_wrong_in_one_line(tmp_path):
  """Each before any work, an output named over an input too, which stays as it was."""
  shutil.copy(BASELINE, tmp_path / "mine.csv")
  shutil.copy(GROUND_TRUTH, tmp_path / "truth.csv")
  for flags, status, message in [
      ([f"--predictions={BASELINE}", f"--ground_truth={tmp_path}/none.csv"], 1,
       f"error: {tmp_path}/none.csv: file not found"),
      ([f"--predictions={BASELINE}", f"--ground_truth={tmp_path}"], 1,
       f"error: {tmp_path}: a folder, not a CSV file"),
      ([f"--predictions={BASELINE}", f"--ground_truth={GROUND_TRUTH}",
        f"--output_json={tmp_path}/no/such/folder/scores.json"], 2,
       f"error: --output_json={tmp_path}/no/such/folder/scores.json: no folder "
       f"{tmp_path}/no/such/folder"),
      ([f"--predictions={tmp_path}/mine.csv", f"--ground_truth={GROUND_TRUTH}",
        f"--output_json={tmp_path}/mine.csv"], 2,
       f"error: --output_json={tmp_path}/mine.csv is the file --predictions reads"),
      ([f"--predictions={BASELINE}", f"--ground_truth={tmp_path}/truth.csv",
        f"--output_json={tmp_path}/./truth.csv"], 2,
       f"error: --output_json={tmp_path}/./truth.csv is the file --ground_truth reads"),
      ([f"--predictions={BASELINE}", f"--ground_truth={GROUND_TRUTH}",
        f"--output_json={tmp_path}"], 2, f"error: --output_json={tmp_path} is a folder"),
      ([f"--predictions={GROUND_TRUTH}", f"--ground_truth={GROUND_TRUTH}"], 1,
       f"error: {GROUND_TRUTH}:1: expected the header caption,file_name_1"),
  ]:
    done = subprocess.run([sys.executable, "-m", "ntxr.dcase", *flags], capture_output=True,
                          text=True, check=False)
    assert done.returncode == status and done.stderr.startswith(message), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
  assert filecmp.cmp(BASELINE, tmp_path / "mine.csv", shallow=False)
  assert filecmp.cmp(GROUND_TRUTH, tmp_path / "truth.csv", shallow=False)


def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing.csv"):
    dcase.score_files(str(tmp_path / "nothing.csv"), BASELINE)


def test_ctrl_c_costs_one_line_and_writes_nothing(tmp_path):
  """Ctrl-C while the command reads its ground truth (a pipe that sends nothing): status
  130, one line, no traceback, and nothing written."""
  pipe, output = tmp_path / "captions.csv", tmp_path / "scores.json"
  os.mkfifo(pipe)
  assert ctrl_c_while_reading(pipe, ["ntxr.dcase", f"--ground_truth={pipe}",
                                     f"--predictions={BASELINE}", f"--output_json={output}"]
                              ) == (130, f"{ctrl_c.AGAIN}\n", "")
  assert os.listdir(tmp_path) == ["captions.csv"]
