"""The sweep: its plan, its runs as real processes, and its table against hand numbers."""

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from ntxr import provenance, ranking, specs, sweep
from ntxr.configs import default


def fake_run(root, strategy, seed, r1, collapse=False, false_negatives=None):
  """A finished run's results.json whose every metric is r1 (t2a) or r1 / 2 (a2t)."""
  workdir = os.path.join(root, strategy, f"seed_{seed}")
  os.makedirs(workdir)
  results = dict(strategy=strategy, collapse=collapse, false_negatives=false_negatives,
                 t2a={m: r1 for m in ranking.T2A}, a2t={m: r1 / 2 for m in ranking.A2T})
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f)


def test_plan_goes_seed_by_seed_with_one_flag_per_axis(tmp_path):
  runs = sweep.plan(str(tmp_path), ["random", "hard_cross"], [0, 1])
  assert [(r.name, r.seed) for r in runs] == [
      ("random", 0), ("hard_cross", 0), ("random", 1), ("hard_cross", 1)]
  assert runs[1].workdir == os.path.join(str(tmp_path), "hard_cross", "seed_0")
  assert runs[1].command(["--config.num_epochs=2"])[2:] == [
      "ntxr.main", "--strategy=hard_cross", "--config.seed=0",
      f"--workdir={runs[1].workdir}", "--config.num_epochs=2"]
  assert sweep.plan(str(tmp_path), ["infonce"], [3])[0].command()[3:5] == [
      "--objective=infonce", "--config.seed=3"]


def test_table_is_the_mean_and_sample_spread_over_seeds(tmp_path):
  root = str(tmp_path)
  fake_run(root, "hard_cross", 0, 0.2, collapse=True)
  fake_run(root, "hard_cross", 1, 0.4)
  fake_run(root, "random", 3, 0.5)
  os.makedirs(os.path.join(root, "random", "seed_4"))  # unfinished: not in the table
  rows = sweep.write_report(root, default.get_config())
  assert [r["strategy"] for r in rows] == ["random", "hard_cross"]  # the registry's order
  random, hard = rows
  assert (random["seeds"], random["collapsed"]) == (1, 0)
  assert random["t2a R@1"][0] == 0.5 and np.isnan(random["t2a R@1"][1])
  assert (hard["seeds"], hard["collapsed"]) == (2, 1)
  # mean 0.3, sample std sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.1414; a2t is half of both.
  assert hard["t2a mAP"] == pytest.approx((0.3, 0.14142136))
  assert hard["a2t HR@10"] == pytest.approx((0.15, 0.07071068))
  with open(os.path.join(root, "results.csv")) as f:
    table = list(csv.DictReader(f))
  assert table[1]["strategy"] == "hard_cross" and table[1]["t2a R@10 std"] == "0.1414"
  assert table[0]["t2a R@10 std"] == "nan"
  with open(os.path.join(root, "provenance.json")) as f:  # runs that recorded none
    assert json.load(f)["runs"] == dict(count=3, commits=["unrecorded"], cpus=["unrecorded"],
                                        first=None, last=None, versions={})
  markdown = open(os.path.join(root, "results.md")).read().splitlines()
  assert markdown[0].startswith("| strategy | t2a R@1 | t2a R@5 |")
  assert markdown[0].endswith("| a2t mAP@10 | a2t mAP | collapse |")
  assert markdown[3].startswith("| hard_cross | 0.300 ± 0.141 |")
  assert markdown[3].endswith("| 0.150 ± 0.071 | 1/2 |")
  assert markdown[2].startswith("| random | 0.500 | 0.500 |")


def test_table_reports_false_negatives_where_every_seed_measured_them(tmp_path):
  root = str(tmp_path)
  unfiltered = dict(filtered_share=0.0, filtered_false_share=0.0)
  for seed, share in [(0, 0.1), (1, 0.3)]:
    fake_run(root, "infonce", seed, 0.5,
             false_negatives=dict(unfiltered, false_negative_share=share))
  fake_run(root, "random", 0, 0.5)
  rows = sweep.table(sweep.read_sweep(root, default.get_config()))
  assert [r["strategy"] for r in rows] == ["random", "infonce"]
  assert rows[1]["false negatives"] == pytest.approx((0.2, np.std([0.1, 0.3], ddof=1)))
  assert "false negatives" not in rows[0]
  assert "filtered" not in rows[1]  # no filter: nothing removed, no share of it
  markdown = sweep.to_markdown(rows).splitlines()
  assert markdown[0].endswith("| a2t mAP | false negatives | collapse |")
  assert markdown[2].endswith("| - | 0/1 |") and "| 0.200 ± 0.141 |" in markdown[3]


def test_table_reports_what_the_filter_removed(tmp_path):
  root = str(tmp_path)
  for seed, (removed, false) in enumerate([(0.02, 0.5), (0.04, 0.7)]):
    fake_run(root, "siglip", seed, 0.5, false_negatives=dict(
        false_negative_share=0.1, filtered_share=removed, filtered_false_share=false))
  row, = sweep.table(sweep.read_sweep(root, default.get_config()))
  assert row["filtered"] == pytest.approx((0.03, np.std([0.02, 0.04], ddof=1)))
  assert row["filtered false"] == pytest.approx((0.6, np.std([0.5, 0.7], ddof=1)))
  markdown = sweep.to_markdown([row]).splitlines()
  assert markdown[0].endswith("| false negatives | filtered | filtered false | collapse |")
  assert markdown[2].endswith("| 0.100 ± 0.000 | 0.030 ± 0.014 | 0.600 ± 0.141 | 0/2 |")


def test_run_all_skips_finished_runs_and_reports_failures(tmp_path, tiny_flags, tiny_config):
  root = str(tmp_path)
  fake_run(root, "random", 0, 0.1)
  fake_run(root, "semihard_cross", 0, 0.2)
  refused = os.path.join(root, "random", "seed_1")
  os.makedirs(os.path.join(refused, "checkpoints", "latest", "10"))  # a run trained there
  with open(os.path.join(refused, "config.json"), "w") as f:
    json.dump({"strategy": "something else"}, f)
  tiny = tiny_flags(num_epochs=1, max_steps_per_epoch=1)
  runs = sweep.plan(root, ["random", "semihard_cross"], [0, 1])
  reports = []
  config = tiny_config(num_epochs=1, max_steps_per_epoch=1)
  failed = sweep.run_all(runs, config, tiny, processes=2, report=reports.append)
  assert reports[0] == "2 of 4 runs finished already; 2 to run, 2 at a time"
  assert failed == [runs[2]]  # random seed 1: its workdir holds other settings
  assert "other settings" in open(os.path.join(refused, "log.txt")).read()
  for finished in (runs[0], runs[1]):
    assert not os.path.exists(os.path.join(finished.workdir, "log.txt"))
  with open(os.path.join(runs[3].workdir, "results.json")) as f:
    results = json.load(f)
  assert (results["strategy"], results["epochs"]) == ("semihard_cross", 1)
  with open(os.path.join(runs[3].workdir, "config.json")) as f:
    assert json.load(f)["seed"] == 1
  assert [run.finished(config) for run in runs] == [True, True, False, True]  # a rerun runs one


def cpu_model() -> str:
  """This machine's CPU as `lscpu` names it (Linux), read apart from ntxr's provenance."""
  found = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
  return next(line.split(":", 1)[1].strip() for line in found.splitlines()
              if line.startswith("Model name:"))


def test_table_of_a_trained_sweep(tiny_sweep, tiny_config):
  rows = sweep.write_report(tiny_sweep, tiny_config(), command="python -m ntxr.sweep --x")
  assert [(r["strategy"], r["seeds"]) for r in rows] == [
      ("random", 2), ("semihard_cross", 2)]
  for row in rows:
    values = []
    for seed in (0, 1):
      with open(os.path.join(tiny_sweep, row["strategy"], f"seed_{seed}", "results.json")) as f:
        values.append(json.load(f)["a2t"]["mAP"])
    assert row["a2t mAP"] == pytest.approx((np.mean(values), np.std(values, ddof=1)))
  assert len(sweep.read_sweep(tiny_sweep, tiny_config())[0]["epochs_log"]) == 2
  for name in sweep.FIGURES:
    with open(os.path.join(tiny_sweep, f"{name}.png"), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(tiny_sweep, "provenance.json")) as f:
    recorded = json.load(f)
  assert recorded["command"] == "python -m ntxr.sweep --x"
  assert recorded["runs"]["count"] == 4
  assert recorded["runs"]["commits"] == [provenance.commit() or "unrecorded"]
  assert recorded["runs"]["cpus"] == [cpu_model()]
  assert recorded["runs"]["first"] <= recorded["runs"]["last"] <= recorded["tabulated"]
  assert recorded["runs"]["versions"]["jax"] == [jax.__version__]
  read_back = sweep.read_csv(os.path.join(tiny_sweep, "results.csv"))
  assert [r["strategy"] for r in read_back] == ["random", "semihard_cross"]
  for row, back in zip(rows, read_back):
    assert back["seeds"] == row["seeds"] and back["collapsed"] == row["collapsed"]
    assert back["a2t mAP"] == pytest.approx(row["a2t mAP"], abs=5e-5)  # 4 decimals


def test_a_results_csv_row_that_does_not_parse_names_its_line(tmp_path):
  path = tmp_path / "results.csv"
  path.write_text("strategy,seeds,collapsed,t2a R@1 mean,t2a R@1 std\n"
                  "random,2,0,0.0340,0.0140\nhard_cross,two,2,0.0340,0.0340\n")
  with pytest.raises(ValueError, match=r"results\.csv:3: not a results\.csv row"):
    sweep.read_csv(str(path))
  path.write_text("strategy,seeds,collapsed,t2a R@1 mean,t2a R@1 std,a2t R@1 mean,a2t R@1 std\n"
                  "random,2,0,0.0340,0.0140,nan,nan\n")
  assert sweep.read_csv(str(path)) == [dict(strategy="random", seeds=2, collapsed=0,
                                            **{"t2a R@1": (0.034, 0.014)})]


def test_each_parallel_process_gets_its_own_gpus(tmp_path, monkeypatch):
  assert sweep.gpu_groups(["0", "1", "2", "3"], 2) == ["0,1", "2,3"]
  assert sweep.gpu_groups(["3", "5"], 2) == ["3", "5"]
  with pytest.raises(ValueError, match="3 GPUs \\(0,1,2\\) do not split evenly into 2"):
    sweep.gpu_groups(["0", "1", "2"], 2)
  lock, busy, seen = threading.Lock(), set(), []

  def fake_execute(run, main_args, env, unused_stopping):
    group = env["CUDA_VISIBLE_DEVICES"]
    with lock:
      assert group not in busy, f"{group} given to two runs at once"
      busy.add(group)
      seen.append((run.seed, group, env.get("XLA_PYTHON_CLIENT_PREALLOCATE")))
    time.sleep(0.05)
    with lock:
      busy.remove(group)
    return run.seed % 2  # odd seeds fail

  monkeypatch.setattr(sweep, "execute", fake_execute)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
  runs = sweep.plan(str(tmp_path), ["random"], range(6))
  failed = sweep.run_all(runs, default.get_config(), processes=2, gpus=["0", "1", "2", "3"],
                         report=lambda _: None)
  assert sorted(r.seed for r in failed) == [1, 3, 5]
  assert sorted(seed for seed, _, _ in seen) == list(range(6))
  assert {group for _, group, _ in seen} == {"0,1", "2,3"}
  assert {preallocate for _, _, preallocate in seen} == {None}  # a GPU each: no sharing


def saved_run(root, strategy, seed, config):
  """A tested run of `config` (with the run's strategy and seed) as ntxr.main leaves it."""
  fake_run(root, strategy, seed, 0.5)
  config = sweep.Run(specs.run_settings()[strategy], seed, "").config(config)
  workdir = os.path.join(root, strategy, f"seed_{seed}")
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json())
  os.makedirs(os.path.join(workdir, "checkpoints", "best", "10"))


def test_a_run_is_finished_only_with_the_settings_it_was_tested_with(tmp_path):
  config = default.get_config()
  saved_run(str(tmp_path), "random", 0, config)
  run, = sweep.plan(str(tmp_path), ["random"], [0])
  assert run.finished(config)
  config.eval_batch_size, config.cache_dir = 3, "elsewhere"  # the same run's numbers
  assert run.finished(config)
  config.num_epochs += 1  # trains on
  assert not run.finished(config)


def test_the_table_leaves_out_runs_of_other_settings(tmp_path):
  root, config = str(tmp_path), default.get_config()
  saved_run(root, "random", 0, config)
  config.margin = 0.2
  saved_run(root, "random", 1, config)
  reports = []
  rows = sweep.write_report(root, config, report=reports.append)
  assert [(r["strategy"], r["seeds"]) for r in rows] == [("random", 1)]
  assert reports == [f"left out of the table: 1 runs tested with other settings than these "
                     f"(first {root}/random/seed_0: margin 0.5 there, 0.2 here)"]


def test_a_sweep_with_other_settings_is_refused_before_any_run_starts(tmp_path, tiny_config,
                                                                      tiny_flags):
  root = str(tmp_path / "root")
  saved_run(root, "random", 0, tiny_config())
  sweep_command = [sys.executable, "-m", "ntxr.sweep", f"--root={root}",
                   "--strategies=random,hard_cross", "--seeds=0", "--"]
  result = subprocess.run(sweep_command + tiny_flags(batch_size=4), capture_output=True,
                          text=True, check=False)
  assert result.returncode == 2 and result.stderr.splitlines() == [
      f"error: {root}/random/seed_0 holds a run with other settings (batch_size: 8 there, 4 "
      "here); use another --root"]
  result = subprocess.run(sweep_command + tiny_flags(batch_size=-3), capture_output=True,
                          text=True, check=False)
  assert result.returncode == 2 and result.stderr.splitlines() == [
      "error: --config.batch_size must be at least 2, not -3"]
  assert sorted(os.listdir(root)) == ["random"]  # nothing started, no table written
  with open(tmp_path / "a file", "w") as f:
    f.write("mine")
  result = subprocess.run([sys.executable, "-m", "ntxr.sweep", f"--root={tmp_path}/a file",
                           "--table_only"], capture_output=True, text=True, check=False)
  assert result.returncode == 2 and result.stderr.splitlines() == [
      f"error: --root={tmp_path}/a file is a file, not a folder: give a folder"]
  result = subprocess.run([sys.executable, "-m", "ntxr.sweep", f"--root={tmp_path}/none",
                           "--table_only"], capture_output=True, text=True, check=False)
  assert result.returncode == 2 and result.stderr.splitlines() == [
      f"error: --root={tmp_path}/none: no such folder, so no runs to tabulate"]
  assert not os.path.exists(tmp_path / "none")


def test_the_runs_flags_read_the_same_as_one_word_or_two(tmp_path, tiny_config, tiny_flags):
  """After --, `--config.FIELD VALUE` is `--config.FIELD=VALUE`, as ntxr.main reads it:
  the run tested with those settings counts as finished either way."""
  root = str(tmp_path / "root")
  saved_run(root, "random", 0, tiny_config())
  one_word = tiny_flags()
  outputs = []
  for flags in (one_word, [word for flag in one_word for word in flag.split("=", 1)]):
    done = subprocess.run([sys.executable, "-m", "ntxr.sweep", f"--root={root}",
                           "--strategies=random", "--seeds=0", "--", *flags],
                          capture_output=True, text=True, check=False)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr[-3000:]
    outputs.append(done.stdout)
  assert outputs[0] == outputs[1]
  assert outputs[0].startswith("1 of 1 runs finished already; 0 to run")


def test_ctrl_c_stops_the_running_runs_and_starts_no_other(tmp_path, monkeypatch):
  """Ctrl-C to the sweep alone (as `kill -INT` sends it): its running run gets it too
  (ntxr.main then saves and exits 130), the next run never starts, and run_all raises
  KeyboardInterrupt once the running one has ended."""
  started = tmp_path / "started"
  run_code = ("import pathlib, signal, sys, time\n"
              "signal.signal(signal.SIGINT, lambda *_: sys.exit(130))\n"
              f"pathlib.Path({str(started)!r}).touch()\n"
              "time.sleep(60)\n")
  monkeypatch.setattr(sweep.Run, "command", lambda run, main_args=(): [sys.executable, "-c",
                                                                       run_code])
  runs = sweep.plan(str(tmp_path / "sweep"), ["random"], [0, 1])

  def press_ctrl_c():
    while not started.exists():
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)

  threading.Thread(target=press_ctrl_c, daemon=True).start()
  reports, handler = [], signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):
    sweep.run_all(runs, default.get_config(), report=reports.append)
  assert reports[1:] == [f"random seed 0: stopped (Ctrl-C); log {runs[0].workdir}/log.txt"]
  assert not os.path.exists(runs[1].workdir)
  assert signal.getsignal(signal.SIGINT) is handler
