"""Two processes on this machine run `ntxr.main --distributed` as two hosts would: a
coordinator on 127.0.0.1, one CPU device each, CPU collectives over gloo.

XLA's CPU backend all-reduces the GRU's weight gradients once per frame step (its GPU
backend moves that out of the loop), and each gloo collective between two processes on
this machine costs milliseconds: the runs here use short clips and short epochs."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from ntxr import train
from processes import free_port, wait_for
from runs import flat, timeless

HEARTBEAT_SECONDS = 10
SHORT = dict(frame_buckets=(32,), max_steps_per_epoch=6, checkpoint_every_steps=3)


def start_run(workdir: pathlib.Path, flags: list) -> list:
  """The run's two processes (process 0 first), each logging to workdir/../process_I.log."""
  port, processes = free_port(), []
  for index in range(2):
    log = open(workdir.parent / f"process_{index}.log", "a")  # pylint: disable=consider-using-with
    processes.append(subprocess.Popen(
        [sys.executable, "-m", "ntxr.main", "--distributed",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={index}", f"--heartbeat_timeout_seconds={HEARTBEAT_SECONDS}",
         f"--workdir={workdir}", *flags],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, JAX_PLATFORMS="cpu")))
    log.close()
  return processes


def log_of(workdir: pathlib.Path, index: int) -> str:
  return (workdir.parent / f"process_{index}.log").read_text()


def test_a_dead_process_ends_the_other_and_a_rerun_resumes_to_match_one(
    tiny_config, tiny_flags, tmp_path):
  """Process 1 killed mid-epoch: process 0 does not wait for it forever. Within the
  heartbeat timeout JAX's coordination service ends it, saying why. Rerun, the two
  processes resume from their last checkpoint and finish with one process's results
  (same global batch of 8); only process 0 writes metrics and results."""
  workdir = tmp_path / "run"
  processes = start_run(workdir, tiny_flags(**SHORT))
  try:
    wait_for(lambda: (workdir / "checkpoints" / "latest" / "3").exists(), processes, 300)
    processes[1].kill()
    # One process's run, to compare with, while process 0 waits out the heartbeat timeout.
    train.train_and_evaluate(tiny_config(**SHORT), str(tmp_path / "one_process"))
    code = processes[0].wait(timeout=HEARTBEAT_SECONDS + 60)
  finally:
    for process in processes:
      process.kill()
      process.wait()
  log = log_of(workdir, 0)
  assert code != 0
  assert "The following tasks are unhealthy (stopped sending heartbeats)" in log
  assert "This most likely indicates that another task died" in log
  assert not (workdir / "results.json").exists()

  before = len(log_of(workdir, 0))
  processes = start_run(workdir, tiny_flags(**SHORT))
  codes = [process.wait(timeout=300) for process in processes]
  assert codes == [0, 0], log_of(workdir, 0)[-3000:] + log_of(workdir, 1)[-3000:]
  assert re.search(r" 3/6 \[00:00<\?", log_of(workdir, 0)[before:])  # resumed at step 3
  results = json.loads((workdir / "results.json").read_text())
  straight = json.loads((tmp_path / "one_process" / "results.json").read_text())
  straight, results = timeless(straight), timeless(results)
  assert flat(results) == pytest.approx(flat(straight), abs=1e-5)
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 2
  assert log_of(workdir, 0).count("results:") == 1 and "results:" not in log_of(workdir, 1)
  assert not list(workdir.glob("*.partial-*"))
