"""What a workdir survives: kills at any moment (of a run, and of runs trained
together), a kill between two epochs' step checkpoints, SIGTERM, a second run, torn metrics, unreadable checkpoints, a full disk."""

import glob
import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
from jax.experimental import multihost_utils
import numpy as np
import pytest

from ntxr import checkpoints as checkpoints_lib, experiment as experiment_lib, sweep, train
from ntxr import workdir as workdir_lib
from processes import descendants, outliving
from runs import (SHORT, TOGETHER_SEEDS, assert_same_run, experiment_of, flat, params_of, read,
                  stop_at_step_12, timeless)


def files_in(pattern) -> bool:
  return bool(glob.glob(str(pattern)))


def metrics_lines(workdir) -> int:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return len(path.read_text().splitlines()) if path.exists() else 0


# Where the fault-injection test kills a run: each phase's sign in the files, and the
# most seconds to wait after it (the moment is drawn from a seeded generator).
KILL_POINTS = (
    ("generating the corpus", lambda cache, work: files_in(cache / "synthetic_tiny.partial-*"),
     0.05),
    ("preparing features", lambda cache, work: files_in(cache / "tfds/*/*/*/*incomplete*"), 1.5),
    ("training", lambda cache, work: (work / "tensorboard").exists(), 4.0),
    ("writing a checkpoint",
     lambda cache, work: files_in(work / "checkpoints/*/*.orbax-checkpoint-tmp"), 0.0),
    ("evaluating", lambda cache, work: metrics_lines(work) == 2, 0.3),
)


def test_a_run_killed_at_random_moments_of_every_phase_ends_as_if_never_killed(
    tiny_config, tiny_flags, tiny_run, tmp_path):
  """SIGKILL in each phase in turn, a rerun after each (the last one in this process):
  the same results.json, and no process a run started outlives it."""
  cache, work = tmp_path / "cache", tmp_path / "run"
  command = [sys.executable, "-m", "ntxr.main", f"--workdir={work}",
             *tiny_flags(cache_dir=cache)]
  moments = random.Random(0)
  for phase, reached, most in KILL_POINTS:
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not reached(cache, work):
      assert run.poll() is None, f"the run ended before {phase}"
      time.sleep(0.005)
    time.sleep(moments.uniform(0, most))
    started = descendants(run.pid)
    assert run.poll() is None and reached(cache, work), f"the run left {phase} before the kill"
    run.kill()
    run.wait()
    assert not outliving(started), f"processes outlived a run killed while {phase}"
  train.train_and_evaluate(tiny_config(cache_dir=str(cache)), str(work))
  straight = json.loads((pathlib.Path(tiny_run) / "results.json").read_text())
  resumed = json.loads((work / "results.json").read_text())
  straight, resumed = timeless(straight), timeless(resumed)
  assert flat(resumed) == flat(straight)


def test_a_together_sweep_killed_at_random_moments_ends_as_if_never_killed(
    tiny_config, tiny_flags, apart_and_together, tmp_path):
  """`ntxr.sweep --together` of hard_audio x two seeds SIGKILLed at a seeded random
  moment while training, while writing a checkpoint (one every two steps) and while
  evaluating, rerun after each (the last one in this process): each run ends as the
  runs trained together unstopped (`assert_same_run`: a kill between the two runs'
  checkpoints leaves them steps apart, and the one behind steps alone to its epoch's
  end), and no process the command started outlives it."""
  root = tmp_path / "sweep"
  overrides = dict(SHORT, checkpoint_every_steps=2)
  runs = sweep.plan(str(root), ["hard_audio"], TOGETHER_SEEDS)
  work = [pathlib.Path(run.workdir) for run in runs]
  command = [sys.executable, "-m", "ntxr.sweep", "--together", f"--root={root}",
             "--strategies=hard_audio", f"--seeds={','.join(map(str, TOGETHER_SEEDS))}",
             "--", *tiny_flags(**overrides)]
  kill_points = (
      ("training", lambda: any((w / "tensorboard").exists() for w in work), 2.0),
      ("writing a checkpoint",
       lambda: any(files_in(w / "checkpoints/*/*.orbax-checkpoint-tmp") for w in work), 0.0),
      ("evaluating", lambda: all(metrics_lines(w) == 1 for w in work), 0.3))
  moments = random.Random(0)
  for phase, reached, most in kill_points:
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not reached():
      assert run.poll() is None, f"the sweep ended before {phase}"
      time.sleep(0.005)
    time.sleep(moments.uniform(0, most))
    started = descendants(run.pid)
    assert run.poll() is None and reached(), f"the sweep left {phase} before the kill"
    run.kill()
    run.wait()
    assert not outliving(started), f"processes outlived a sweep killed while {phase}"
  assert sweep.run_together(runs, tiny_config(**overrides), report=lambda line: None) == []
  unstopped = {config.seed: workdir for config, workdir in apart_and_together[1]
               if config.strategy == "hard_audio"}
  for run in runs:
    assert read(run.workdir)[0]["frozen"] is None
    assert_same_run(run.workdir, unstopped[run.seed])


def test_a_run_killed_mid_epoch_resumes_from_its_step_checkpoint_as_if_never_killed(
    tiny_config, tiny_flags, tiny_run, tmp_path, monkeypatch):
  """SIGKILL (no handler runs: nothing is saved at the kill) just after the periodic
  checkpoint of step 4, in the first epoch's 15 steps: the rerun resumes there, steps
  only the epoch's other 11 batches, and ends with the unkilled run's parameters and
  results (checkpoint_every_steps changes nothing a run computes)."""
  work = tmp_path / "run"
  run = subprocess.Popen([sys.executable, "-m", "ntxr.main", f"--workdir={work}",
                          *tiny_flags(checkpoint_every_steps=4)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  while not (work / "checkpoints" / "latest" / "4").exists():
    assert run.poll() is None, "the run ended before its checkpoint of step 4"
    time.sleep(0.002)
  run.kill()
  run.wait()
  assert metrics_lines(work) == 0  # killed in the first epoch
  with checkpoints_lib.Checkpoints(str(work)) as checkpoints:
    saved, step = checkpoints.progress("latest"), checkpoints.step("latest")
  assert step in (4, 8, 12) and (saved["epoch"], saved["step_in_epoch"]) == (0, step)
  stepped = []
  train_step = experiment_lib.Experiment.train_step
  def counted(self, state, batch, key):
    stepped.append(1)
    return train_step(self, state, batch, key)
  monkeypatch.setattr(experiment_lib.Experiment, "train_step", counted)
  resumed = train.train_and_evaluate(tiny_config(checkpoint_every_steps=4), str(work))
  assert len(stepped) == 30 - step  # the first epoch's rest, then the second
  (step_a, a), (step_b, b) = params_of(str(tiny_run)), params_of(str(work))
  assert step_a == step_b == 30
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
  straight = json.loads((pathlib.Path(tiny_run) / "results.json").read_text())
  straight, resumed = timeless(straight), timeless(resumed)
  assert flat(resumed) == flat(straight)


def test_sigterm_saves_the_step_in_flight_and_a_rerun_finishes_as_if_never_stopped(
    tiny_config, tiny_run, tmp_path, monkeypatch):
  config, workdir = tiny_config(), tmp_path / "run"
  assert not stop_at_step_12(config, workdir, monkeypatch).interrupted
  train.train_and_evaluate(config, str(workdir))
  (step_a, a), (step_b, b) = params_of(str(tiny_run)), params_of(str(workdir))
  assert step_a == step_b
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
  # The stopped epoch's training means count the steps before the stop too.
  straight, resumed = ([json.loads(l)["training"] for l in (pathlib.Path(w) / "metrics.jsonl")
                        .read_text().splitlines()] for w in (tiny_run, workdir))
  assert resumed == [pytest.approx(epoch, rel=1e-4, abs=1e-6) for epoch in straight]


def test_sigterm_during_validation_saves_the_epochs_steps_and_a_rerun_finishes_the_same(
    tiny_config, tiny_run, tmp_path, monkeypatch):
  config, workdir = tiny_config(), tmp_path / "run"
  validate = experiment_lib.Experiment.validate
  def terminated_validation(self, state, training, epoch):
    os.kill(os.getpid(), signal.SIGTERM)
    return validate(self, state, training, epoch)
  with monkeypatch.context() as m:
    m.setattr(experiment_lib.Experiment, "validate", terminated_validation)
    with pytest.raises(train.Stopped, match=re.escape("stopped after step 15 (epoch 1)")):
      train.train_and_evaluate(config, str(workdir))
  with checkpoints_lib.Checkpoints(str(workdir)) as checkpoints:  # the steps' end, epoch 1 to do
    saved = checkpoints.progress("latest")
  assert (checkpoints.step("latest"), saved["epoch"], saved["step_in_epoch"]) == (15, 0, 15)
  results = train.train_and_evaluate(config, str(workdir))
  straight = json.loads((pathlib.Path(tiny_run) / "results.json").read_text())
  straight, results = timeless(straight), timeless(results)
  assert flat(results) == flat(straight)  # validated, saved over step 15, tested as if whole


def test_a_stop_whose_raise_python_drops_still_stops_training(tiny_config, tmp_path,
                                                              monkeypatch, capfd):
  """Ctrl-C handled inside a __del__ during the last epoch's validation, as in JAX's and
  TensorFlow's garbage-collection callbacks: Python drops what the handler raises there.
  It goes unreported, and training stops at the epoch's end instead of testing."""
  config, workdir = tiny_config(num_epochs=1), tmp_path / "run"

  class Collected:
    def __del__(self):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(5)  # the handler runs, and raises, in here

  validate = experiment_lib.Experiment.validate
  def validation_with_a_collection(self, state, training, epoch):
    Collected()
    return validate(self, state, training, epoch)
  monkeypatch.setattr(experiment_lib.Experiment, "validate", validation_with_a_collection)
  with pytest.raises(train.Stopped, match=re.escape(
      "as asked (Ctrl-C), training stopped after step 15 (epoch 1)")):
    train.train_and_evaluate(config, str(workdir))
  assert "Interrupted" not in capfd.readouterr().err
  assert not (workdir / "results.json").exists()


def test_several_processes_stop_at_jaxs_preemption_sync_point(monkeypatch):
  """Under --distributed every process must stop at the same step: the one JAX's
  preemption service agrees on (each process calls it every step), not its own SIGTERM."""
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: step == 7)
  with train.StopRequests() as stop:
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # JAX's service handles it
    assert [step for step in range(1, 10) if stop.asked(step)] == [7]


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_and_the_run_goes_on(
    tiny_config, tiny_run, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(tiny_run, workdir)
  metrics = workdir / "metrics.jsonl"
  first, second = metrics.read_text().splitlines()
  metrics.write_text(first + "\n" + second[:len(second) // 2])  # killed mid-append
  results = train.train_and_evaluate(tiny_config(), str(workdir))
  assert results["epochs"] == 2
  assert "metrics.jsonl:2: dropped a torn or partial line" in caplog.text
  assert [json.loads(l)["epoch"] for l in metrics.read_text().splitlines()] == [1]


def test_a_second_run_on_a_workdir_in_use_is_refused_naming_the_holder(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom ntxr import workdir\n"
       "with workdir.in_use(sys.argv[1]):\n  print('held', flush=True)\n  time.sleep(600)",
       workdir], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir_lib.WorkdirInUse, match=re.escape(
        f"in use by another run (host {socket.gethostname()}, pid {holder.pid})")):
      train.train_and_evaluate(tiny_config(), workdir)
  finally:
    holder.kill()  # SIGKILL: the kernel releases its lock
    holder.wait()
  with workdir_lib.in_use(workdir):  # a lock left by a dead process blocks nothing
    pass


def corrupt(checkpoint: pathlib.Path):
  """Truncates every array file of an Orbax checkpoint, as a bad disk or copy would."""
  for data in (checkpoint / "state").rglob("d/*"):
    data.write_bytes(data.read_bytes()[:10])


# In-process, Orbax's reports of the unread arrays reach Python's unraisable hook: the
# commands quiet them (command.start; the next test checks the command's stderr).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_unreadable_latest_checkpoint_is_set_aside_and_the_previous_one_resumed(
    tiny_config, tiny_run, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(tiny_run, workdir)
  latest = workdir / "checkpoints" / "latest"
  assert sorted(int(p.name) for p in latest.iterdir()) == [25, 30]  # the previous is kept
  corrupt(latest / "30")
  results = train.train_and_evaluate(tiny_config(), str(workdir))
  assert f"{latest}/30 cannot be read (OUT_OF_RANGE" in caplog.text
  assert f"resuming from {latest}/25" in caplog.text
  assert [p.name[:9] for p in (workdir / "checkpoints" / "unreadable").iterdir()] == [
      "latest_30"]
  assert params_of(str(workdir))[0] == 30  # step 30 trained again and saved anew
  straight = json.loads((pathlib.Path(tiny_run) / "results.json").read_text())
  for direction in ("t2a", "a2t"):
    assert results[direction] == pytest.approx(straight[direction], abs=1e-6)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_with_both_latest_checkpoints_unreadable_the_best_alone_is_resumed(
    tiny_config, tiny_run, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(tiny_run, workdir)
  root = workdir / "checkpoints"
  for step in ("25", "30"):
    corrupt(root / "latest" / step)
  (best,) = [int(p.name) for p in (root / "best").iterdir()]
  initial = experiment_of(tiny_config()).initial_state
  with checkpoints_lib.Checkpoints(str(workdir)) as checkpoints:
    saved = checkpoints.progress("best")
    state, progress = checkpoints.resume(initial)
  assert int(state.step) == best and progress == saved
  assert f"resuming from {root}/best/{best}" in caplog.text
  assert sorted(p.name[:9] for p in (root / "unreadable").iterdir()) == [
      "latest_25", "latest_30"]


def test_no_readable_checkpoint_stops_with_one_clear_error(tiny_flags, tiny_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(tiny_run, workdir)
  for checkpoint in (workdir / "checkpoints").glob("*/*"):
    corrupt(checkpoint)
  run = subprocess.run([sys.executable, "-m", "ntxr.main", f"--workdir={workdir}",
                        *tiny_flags()], capture_output=True, text=True, check=False)
  assert run.returncode == 1
  error = run.stderr.splitlines()[-1]
  assert error.startswith("error: no checkpoint of this run can be read: ")
  for name in ("latest/25", "latest/30", "best/"):
    assert f"{workdir}/checkpoints/{name}" in error
  assert error.endswith(f"Remove {workdir}/checkpoints to train again from the start")
  assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr


def test_a_full_disk_stops_with_one_clear_error_and_a_rerun_resumes(
    tiny_config, tiny_flags, tiny_run, tmp_path):
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(num_epochs=1), str(workdir))  # checkpoints 10, 15
  disk_full = ("import resource, runpy\n"  # writes past 16 KiB fail, as with no space left
               "resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.RLIM_INFINITY))\n"
               "runpy.run_module('ntxr.main', run_name='__main__')")
  run = subprocess.run([sys.executable, "-c", disk_full, f"--workdir={workdir}",
                        *tiny_flags(num_epochs=2)], capture_output=True, text=True, check=False)
  assert run.returncode == 1
  error = run.stderr.splitlines()[-1]
  assert error.startswith(f"error: a checkpoint could not be written in {workdir}/checkpoints "
                          f"(OUT_OF_RANGE: Error writing ")
  assert "File too large" in error and f"{workdir}/checkpoints/latest/25.orbax-checkpoint-tmp" in error
  assert error.endswith("is the disk full? The checkpoints before it are intact (latest/10, "
                        "latest/15, best/15): free space and rerun the same command to resume")
  assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr
  assert "ERROR" not in run.stderr  # Orbax's threads' lines: the error above says it all
  results = train.train_and_evaluate(tiny_config(), str(workdir))
  assert not list(workdir.rglob("*.orbax-checkpoint-tmp"))  # the torn write is cleared
  straight = json.loads((pathlib.Path(tiny_run) / "results.json").read_text())
  for direction in ("t2a", "a2t"):
    assert results[direction] == pytest.approx(straight[direction], abs=1e-6)


