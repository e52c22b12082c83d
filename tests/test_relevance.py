"""Retrieval judged by people: several relevant clips per query (DCASE 2025) and graded
ratings (TAU), on the real files in tests/data, against loops written per query here."""

import ast
import csv
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from ntxr import dcase, ranking, relevance

DATA = os.path.join(os.path.dirname(__file__), "data")
RELEVANCE = os.path.join(DATA, "dcase2025", "metadata_eval.csv")
GROUND_TRUTH = os.path.join(DATA, "dcase2022", "clotho_evaluation_captions.csv")
BASELINE = os.path.join(DATA, "dcase2022", "baseline_top10.csv")
TAU = os.path.join(DATA, "tau_relevances")


def loop_metrics(relevant: dict, ranked: dict) -> dict:
  """DCASE 2025's metrics, one query at a time, as its baseline defines them."""
  totals = dict.fromkeys(ranking.MULTI, 0.0)
  for query, files in relevant.items():
    ranks = sorted(ranked[query].index(f) for f in files if f in ranked[query])
    for k in (10, 16):
      totals[f"mAP@{k}"] += sum(i / (r + 1) for i, r in enumerate(ranks, 1) if r < k) / len(files)
    for k in (1, 5, 10):
      totals[f"R@{k}"] += sum(r < k for r in ranks) / len(files)
      totals[f"HR@{k}"] += any(r < k for r in ranks)
  return {k: v / len(relevant) for k, v in totals.items()}


def loop_ndcg(ratings: dict, ranked: dict, k: int) -> float:
  values = []
  for query, rated in ratings.items():
    dcg = sum(rated.get(f, 0) / 100 / math.log2(r + 2) for r, f in enumerate(ranked[query][:k]))
    best = sorted(rated.values(), reverse=True)[:k]
    ideal = sum(g / 100 / math.log2(r + 2) for r, g in enumerate(best))
    if ideal > 0:
      values.append(dcg / ideal)
  return float(np.mean(values))


def test_ap_at_k_by_hand():
  # Relevant files at 0-based ranks 0, 3 and 20, and one the ranking lacks: n = 4.
  ranked = {"q": [f"f{i}" for i in range(25)]}
  m = relevance.multi_relevance_metrics({"q": ("f0", "f3", "f20", "absent")}, ranked)
  assert m["mAP@16"] == m["mAP@10"] == pytest.approx((1 / 1 + 2 / 4) / 4)
  assert (m["R@1"], m["R@5"], m["R@10"], m["HR@1"], m["queries"]) == (0.25, 0.5, 0.5, 1.0, 1)
  # With one relevant file AP@k is 1 / rank within the top k, the 2022 mAP@10.
  assert relevance.multi_relevance_metrics({"q": ("f3",)}, ranked)["mAP@10"] == 0.25
  # Twelve relevant files ranked first: DCASE 2025 divides by all 12, not by 10.
  twelve = relevance.multi_relevance_metrics({"q": tuple(f"f{i}" for i in range(12))}, ranked)
  assert (twelve["mAP@10"], twelve["mAP@16"]) == (pytest.approx(10 / 12), 1.0)


@pytest.mark.parametrize("seed", range(3))
def test_multi_relevance_metrics_match_the_per_query_loop(seed):
  rng = np.random.default_rng(seed)
  files = [f"{i}.wav" for i in range(40)]
  scores = rng.integers(0, 6, size=(30, 40)).astype(float)  # many ties
  relevant = {}
  for q in range(30):
    count = int(rng.integers(1, 13))
    chosen = rng.choice(45, count, replace=False)  # some beyond the ranked files
    relevant[f"query {q}"] = tuple(f"{i}.wav" for i in chosen)
  ranked = relevance.ranked_by_score(list(relevant), files, scores)
  for q, row in enumerate(scores):  # ties: the lower index first
    assert ranked[f"query {q}"] == [files[j] for j in sorted(range(40), key=lambda j: (-row[j], j))]
  got = relevance.multi_relevance_metrics(relevant, ranked)
  assert got.pop("queries") == 30
  assert got == pytest.approx(loop_metrics(relevant, ranked), abs=1e-12)
  top10 = {q: r[:10] for q, r in ranked.items()}  # a top-10 list scores as far as it ranks
  expected = loop_metrics(relevant, top10)
  got = relevance.multi_relevance_metrics(relevant, top10)
  assert got["mAP@16"] == pytest.approx(expected["mAP@16"]) == got["mAP@10"]


def test_ndcg_matches_the_loop_and_a_hand_worked_query():
  ratings = {"q": {"a": 100, "b": 50, "c": 0}}
  m = relevance.graded_metrics(ratings, {"q": ["b", "x", "a", "c"]}, ks=(2, 16))
  ideal = 1 + 0.5 / math.log2(3)
  assert m["nDCG@2"] == pytest.approx(0.5 / ideal)
  assert m["nDCG@16"] == pytest.approx((0.5 + 1 / math.log2(4)) / ideal)
  rng = np.random.default_rng(0)
  files = [f"{i}.wav" for i in range(30)]
  ratings = {f"q{q}": {files[j]: float(rng.integers(0, 101)) for j in rng.choice(30, 17, False)}
             for q in range(12)}
  ratings["q0"] = dict.fromkeys(ratings["q0"], 0.0)  # no ideal: left out
  ranked = relevance.ranked_by_score(list(ratings), files, rng.normal(size=(12, 30)))
  got = relevance.graded_metrics(ratings, ranked)
  assert got["queries"] == 11
  for k in (10, 16):
    assert got[f"nDCG@{k}"] == pytest.approx(loop_ndcg(ratings, ranked, k))


def read_rows(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.reader(f))[1:]


def test_the_real_2025_relevance_file_reads_as_the_challenge_wrote_it():
  relevant = relevance.read_dcase2025(RELEVANCE)
  assert len(relevant) == 1037
  counts = [len(files) for files in relevant.values()]
  assert (min(counts), max(counts), sum(counts)) == (1, 12, 3116)
  assert any("&#39;" in f for files in relevant.values() for f in files)
  _, evaluation_files = dcase.read_ground_truth(GROUND_TRUTH)
  assert {f for files in relevant.values() for f in files} <= evaluation_files


def run_dcase(*flags):
  return subprocess.run([sys.executable, "-m", "ntxr.dcase", *flags], capture_output=True,
                        text=True, check=False)


def test_the_2022_baseline_submission_scored_by_2025_relevance_matches_the_loop(tmp_path):
  done = run_dcase(f"--relevance={RELEVANCE}", f"--predictions={BASELINE}",
                   f"--ground_truth={GROUND_TRUTH}", f"--output_json={tmp_path}/s.json")
  assert done.returncode == 0, done.stderr
  got = json.loads((tmp_path / "s.json").read_text())
  relevant = {q: ast.literal_eval(names) for q, names in read_rows(RELEVANCE)}
  ranked = {row[0]: row[1:] for row in read_rows(BASELINE)}
  assert got.pop("queries") == 1037
  # A top-10 list ranks nothing beyond its tenth file: its mAP@16 only bounds the value.
  assert got.pop("lower_bounds") == ["mAP@16"]
  assert got == pytest.approx(loop_metrics(relevant, ranked), abs=1e-12)
  assert 0 < got["mAP@16"] < 0.2  # a weak 2022 baseline
  assert (f"mAP@16 {got['mAP@16']:.4f} (a lower bound: a top-10 list ranks no file beyond "
          f"its tenth)  mAP@10 {got['mAP@10']:.4f}  R@1 ") in done.stdout
  assert done.stdout.count("lower bound") == 1 and done.stderr == ""


def test_a_2025_score_matrix_round_trips_and_scores_as_the_loop(tmp_path):
  relevant = relevance.read_dcase2025(RELEVANCE)
  _, names = dcase.read_ground_truth(GROUND_TRUTH)
  names = sorted(names)
  queries = list(relevant)
  s = np.random.default_rng(0).normal(size=(len(queries), len(names))).astype(np.float32)
  path = str(tmp_path / "scores.csv")
  dcase.write_score_matrix(path, queries, names, s)
  got = dcase.score_2025(RELEVANCE, path, GROUND_TRUTH)
  read_back = {row[0]: np.array(row[1:], float) for row in read_rows(path)}
  ranked = {q: [names[j] for j in np.argsort(-read_back[q], kind="stable")] for q in queries}
  assert got.pop("queries") == 1037
  assert got == pytest.approx(loop_metrics(relevant, ranked), abs=1e-12)


def test_a_score_matrix_that_leaves_out_files_of_the_split_is_warned_about(tmp_path):
  """Files a score matrix leaves out are never retrieved: the command says so in one
  warning, and its scores are those of a ranking with them appended last, beyond every
  cut-off (it scores 1,040 files). A matrix of every file of the split gets no warning,
  and neither's mAP@16 is a lower bound."""
  relevant = relevance.read_dcase2025(RELEVANCE)
  _, names = dcase.read_ground_truth(GROUND_TRUTH)
  names, queries = sorted(names), list(relevant)
  s = np.random.default_rng(2).normal(size=(len(queries), len(names))).astype(np.float32)
  warnings = []
  for scored in (names, names[5:]):
    path = tmp_path / f"scores_{len(scored)}.csv"
    dcase.write_score_matrix(str(path), queries, scored, s[:, -len(scored):])
    done = run_dcase(f"--relevance={RELEVANCE}", f"--predictions={path}",
                     f"--ground_truth={GROUND_TRUTH}", f"--output_json={tmp_path}/got.json")
    assert done.returncode == 0 and "lower bound" not in done.stdout, done.stderr
    warnings.append(done.stderr)
    read_back = {row[0]: np.array(row[1:], float) for row in read_rows(path)}
    ranked = {q: [scored[j] for j in np.argsort(-read_back[q], kind="stable")]
              + [name for name in names if name not in scored] for q in queries}
    got = json.loads((tmp_path / "got.json").read_text())
    assert got.pop("queries") == 1037
    assert got == pytest.approx(loop_metrics(relevant, ranked), abs=1e-12)
  assert warnings == ["", (
      f"WARNING: {path} scores {len(names) - 5} of the split's {len(names)} files: the other "
      f"5 ({', '.join(names[:3])}, ...) count as never retrieved\n")]


def test_a_matrix_that_leaves_out_a_judged_file_is_warned_about_and_scored_by_hand(tmp_path):
  """Without --ground_truth the files are the relevance file's. z.wav, unscored, is never
  retrieved, though a third rank would be within every cut-off: "a dog barks" has x.wav
  second, AP (1/2) / 2 = 1/4; "rain" has y.wav first, AP 1; mAP@16 5/8."""
  (tmp_path / "m.csv").write_text("query,audio_filenames\n\"a dog barks\",\"['x.wav', 'z.wav']\"\n"
                                  "\"rain\",\"['y.wav']\"\n")
  (tmp_path / "s.csv").write_text("query,x.wav,y.wav\na dog barks,1,2\nrain,1,2\n")
  done = run_dcase(f"--relevance={tmp_path}/m.csv", f"--predictions={tmp_path}/s.csv",
                   f"--output_json={tmp_path}/got.json")
  assert done.returncode == 0, done.stderr
  assert done.stderr == (f"WARNING: {tmp_path}/s.csv scores 2 of the relevance file's 3 "
                         "files: the other 1 (z.wav) count as never retrieved\n")
  got = json.loads((tmp_path / "got.json").read_text())
  assert (got["queries"], got["mAP@16"], got["R@1"], got["HR@1"]) == (
      2, 5 / 8, 0.5, 0.5)


@pytest.mark.parametrize("rows, message", [
    ('"a dog barks","[\'x.wav\']"\n"a dog barks","[\'y.wav\']"\n',
     r":3: query 'a dog barks' is given twice \(first at line 2\)"),
    ('"a dog barks","x.wav, y.wav"\n', r":2: expected a Python list of file names"),
    ('"a dog barks","[]"\n', r":2: expected a Python list of file names"),
    ('" ","[\'x.wav\']"\n', r":2: the query is empty"),
])
def test_a_bad_relevance_row_is_named_by_line(tmp_path, rows, message):
  path = tmp_path / "metadata_eval.csv"
  path.write_text("query,audio_filenames\n" + rows)
  with pytest.raises(ValueError, match=re.escape(str(path)) + message):
    relevance.read_dcase2025(str(path))


@pytest.mark.parametrize("matrix, message", [
    ("query,x.wav,z.wav\n",
     r":1: unknown file 'z.wav': not in .*metadata_eval.csv \(--ground_truth"),
    ("query,x.wav,y.wav\nrain,1,2\n", r":2: unknown query 'rain': not in"),
    ("query,x.wav,y.wav\na dog barks,1,2\na dog barks,2,1\n",
     r":3: query 'a dog barks' is given twice \(first at line 2\)"),
    ("query,x.wav,y.wav\na dog barks,1,nan\n", r":2: every score must be a finite number"),
    ("query,x.wav,y.wav\na dog barks,1\n", r":2: expected a query and 2 scores, got 1"),
    ("query,x.wav,x.wav\n", r":1: file 'x.wav' has two columns"),
])
def test_a_bad_score_matrix_is_named_by_line(tmp_path, matrix, message):
  (tmp_path / "metadata_eval.csv").write_text(
      "query,audio_filenames\n\"a dog barks\",\"['x.wav', 'y.wav']\"\n")
  (tmp_path / "scores.csv").write_text(matrix)
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / "scores.csv")) + message):
    dcase.score_2025(str(tmp_path / "metadata_eval.csv"), str(tmp_path / "scores.csv"))


def test_a_query_without_a_ranking_is_refused(tmp_path):
  (tmp_path / "m.csv").write_text("query,audio_filenames\n\"a dog\",\"['x.wav']\"\n"
                                  "\"rain\",\"['y.wav']\"\n")
  (tmp_path / "s.csv").write_text("query,x.wav,y.wav\na dog,1,2\n")
  with pytest.raises(ValueError, match="1 judged queries have no ranking, e.g. 'rain'"):
    dcase.score_2025(str(tmp_path / "m.csv"), str(tmp_path / "s.csv"))


def test_the_real_tau_ratings_read_by_text_and_file_name():
  tau = relevance.read_tau(TAU, "evaluation")
  assert len(tau.ratings) == 12 and all(len(r) == 17 for r in tau.ratings.values())
  for query, groups in tau.groups.items():
    assert sorted(groups.values()).count("C15") == 15
    (own,) = [f for f, g in groups.items() if g == "TP"]
    assert query in tau.captions[own]  # the query is one of its own clip's captions
  rows = read_rows(os.path.join(TAU, "evaluation_relevances.csv"))
  assert sum(len(r) for r in tau.ratings.values()) == len(rows) == 204


def test_graded_scoring_of_a_score_matrix_matches_the_loop(tmp_path):
  tau = relevance.read_tau(TAU, "evaluation")
  names = sorted(tau.captions)
  captions = [c for f in names for c in tau.captions[f]]
  s = np.random.default_rng(1).normal(size=(len(captions), len(names)))
  dcase.write_score_matrix(str(tmp_path / "s.csv"), captions, names, s)
  done = run_dcase(f"--graded_relevance={TAU}", "--split=evaluation",
                   f"--predictions={tmp_path}/s.csv", f"--output_json={tmp_path}/g.json")
  assert done.returncode == 0, done.stderr
  got = json.loads((tmp_path / "g.json").read_text())
  read_back = {row[0]: np.array(row[1:], float) for row in read_rows(tmp_path / "s.csv")}
  ranked = {q: [names[j] for j in np.argsort(-read_back[q], kind="stable")]
            for q in tau.ratings}
  assert got["queries"] == 12
  for k in (10, 16):
    assert got[f"nDCG@{k}"] == pytest.approx(loop_ndcg(tau.ratings, ranked, k), abs=1e-12)


def test_a_top_10_lists_ndcg_at_16_is_a_lower_bound(tmp_path):
  """Each rated query's ten best-rated clips, best first: nDCG@10 is 1 (the ideal order),
  and nDCG@16, short of the six clips beyond the tenth, is printed and listed in the
  JSON as a lower bound."""
  tau = relevance.read_tau(TAU, "evaluation")
  path = tmp_path / "top10.csv"
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(dcase.COLUMNS)
    for query, rated in tau.ratings.items():
      writer.writerow([query, *sorted(rated, key=lambda name: -rated[name])[:10]])
  done = run_dcase(f"--graded_relevance={TAU}", "--split=evaluation", f"--predictions={path}",
                   f"--output_json={tmp_path}/g.json")
  assert done.returncode == 0, done.stderr
  got = json.loads((tmp_path / "g.json").read_text())
  assert (got["queries"], got["nDCG@10"], got["lower_bounds"]) == (
      12, pytest.approx(1.0), ["nDCG@16"])
  assert got["nDCG@16"] < 1
  assert (f"nDCG@16 {got['nDCG@16']:.4f} (a lower bound: a top-10 list ranks no file beyond "
          "its tenth)") in done.stdout and done.stdout.count("lower bound") == 1


def test_a_bad_rating_is_named_by_file_and_line(tmp_path):
  for name in os.listdir(TAU):
    (tmp_path / name).write_bytes(open(os.path.join(TAU, name), "rb").read())
  path = tmp_path / "evaluation_relevances.csv"
  lines = path.read_text().splitlines()
  tid, fid, group, _ = lines[3].split(",")
  lines[3] = ",".join([tid, fid, group, "high"])
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=re.escape(f"{path}:4: rating 'high' is not 0 to 100")):
    relevance.read_tau(str(tmp_path), "evaluation")
