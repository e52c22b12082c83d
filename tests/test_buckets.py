"""A workdir in a bucket, against a local Cloud Storage emulator (gcp-storage-emulator)
reached as a bucket is: etils.epath through its gcsfs client (EPATH_USE_TF=false:
TensorFlow's own client has no emulator endpoint) for ntxr's files, tensorstore for
Orbax's arrays. The tests read the bucket through the emulator's JSON API, not through ntxr.

Orbax's default array format (OCDBT) writes with generation preconditions, which the
emulator does not keep: the whole run here uses Orbax's per-array format instead.

The emulator runs in memory, where it still serialises its whole object table after
every write and delete (kept only to reload it at a restart, which an in-memory
emulator never does): that is switched off, or an Orbax save of a few hundred objects
costs it quadratic time. Its one-threaded server listens with Python's default backlog of
5 connections: Orbax's threads open more at once, and the refused ones are retried after
a back-off, so the backlog is raised."""

import csv
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

from etils.epath import gpath
import numpy as np
import pytest

from ntxr import dcase, files, metrics_log, settings, workdir as workdir_lib
from ntxr.data import builders, corpus, staging
from processes import free_port, wait_for
from runs import flat, timeless

BUCKET = "ntxr-runs"
# ntxr.main with Orbax's per-array format (see above).
MAIN_PER_ARRAY = (
    "import functools, runpy\n"
    "from orbax.checkpoint._src.handlers import standard_checkpoint_handler as handler\n"
    "handler.StandardCheckpointHandler.__init__ = functools.partialmethod(\n"
    "    handler.StandardCheckpointHandler.__init__, use_ocdbt=False)\n"
    "runpy.run_module('ntxr.main', run_name='__main__')")
# gcp-storage-emulator, in memory, without rewriting its object table per request, and
# with a listening backlog for the clients' concurrent connections (see above).
EMULATOR_IN_MEMORY = (
    "import http.server, sys\n"
    "from gcp_storage_emulator import __main__ as emulator, storage\n"
    "storage.Storage._write_config_to_file = lambda self: None\n"
    "http.server.HTTPServer.request_queue_size = 1024\n"
    "emulator.main(sys.argv[1:])")


class Emulator:
  """The bucket's objects, read over the emulator's JSON API."""

  def __init__(self, url: str):
    self.url = url

  def names(self, prefix: str) -> list:
    query = urllib.parse.urlencode(dict(prefix=prefix))
    with urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}/o?{query}") as response:
      return sorted(item["name"] for item in json.load(response).get("items", []))

  def write(self, name: str, data: bytes) -> None:
    query = urllib.parse.urlencode(dict(uploadType="media", name=name))
    request = urllib.request.Request(f"{self.url}/upload/storage/v1/b/{BUCKET}/o?{query}",
                                     data=data, method="POST")
    urllib.request.urlopen(request).close()

  def read(self, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(
        f"{self.url}/download/storage/v1/b/{BUCKET}/o/{quoted}?alt=media") as response:
      return response.read()


@pytest.fixture(scope="module")
def emulator():
  port = free_port()
  server = subprocess.Popen(
      [sys.executable, "-c", EMULATOR_IN_MEMORY, "start", "--host=127.0.0.1", f"--port={port}",
       "--in-memory", "--quiet", f"--default-bucket={BUCKET}"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  found = Emulator(f"http://127.0.0.1:{port}")
  deadline = time.monotonic() + 30
  while True:
    try:
      found.names("")
      break
    except OSError:
      assert time.monotonic() < deadline and server.poll() is None, "the emulator did not start"
      time.sleep(0.2)
  yield found
  server.kill()
  server.wait()


@pytest.fixture
def bucket(emulator, monkeypatch, tmp_path, request):
  """A fresh gs:// workdir on the emulator (the test runs in an empty local folder).
  epath decides once per process whether TensorFlow reaches buckets: that decision is
  cleared here and after the test."""
  monkeypatch.setenv("EPATH_USE_TF", "false")
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
  monkeypatch.chdir(tmp_path)
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  yield f"gs://{BUCKET}/{request.node.name}", request.node.name
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access


def test_config_metrics_results_and_the_dcase_file_are_written_to_the_bucket(
    emulator, bucket, tiny_config, tmp_path):
  workdir, prefix = bucket
  config = tiny_config()
  settings.write(workdir, config)
  assert json.loads(emulator.read(f"{prefix}/config.json")) == json.loads(config.to_json())
  assert settings.saved(workdir)["strategy"] == config.strategy
  settings.write(workdir, tiny_config(strategy="hard_cross"))  # nothing trained: mendable
  files.write_text(f"{workdir}/checkpoints/latest/10/done", "")  # a run trained there
  with pytest.raises(ValueError, match="holds a run with other settings \\(strategy: "
                     "'hard_cross' there, 'random' here\\)"):
    settings.write(workdir, tiny_config(strategy="random"))

  with subprocess.Popen([sys.executable, "-c", "pass"]) as gone:  # a run killed with SIGKILL
    gone.wait()
  left = tempfile.mkdtemp(prefix=f"ntxr-tensorboard.partial-{gone.pid}-")  # left its staging
  with metrics_log.MetricsLog(workdir, completed_epochs=0) as log:
    assert not os.path.exists(left) and os.path.isdir(log.staged)
    for epoch in (1, 2):
      log.write(epoch * 15, dict(epoch=epoch, training=dict(loss=1.0 / epoch)))
    events = emulator.names(f"{prefix}/tensorboard/")
    assert len(events) == 1 and "tfevents" in events[0] and emulator.read(events[0])
  lines = emulator.read(f"{prefix}/metrics.jsonl").decode().splitlines()
  assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
  with metrics_log.MetricsLog(workdir, completed_epochs=1):  # a rerun redoes epoch 2
    assert files.read_jsonl(f"{workdir}/metrics.jsonl") == [json.loads(lines[0])]

  s = np.random.default_rng(0).normal(size=(3, 12))
  submission = dcase.Submission(["a dog", "rain", "a car"], [f"{i}.wav" for i in range(12)], s)
  results = dict(split="test", t2a={"R@1": 0.5})
  workdir_lib.write_results(workdir, results, submission)
  (tmp_path / "local").mkdir()
  workdir_lib.write_results(str(tmp_path / "local"), results, submission)
  assert json.loads(emulator.read(f"{prefix}/results.json")) == results
  rows = list(csv.reader(io.StringIO(emulator.read(f"{prefix}/dcase_test.csv").decode())))
  best_first = np.argsort(-s, axis=1, kind="stable")[:, :10]
  assert rows == [["caption"] + [f"file_name_{k}" for k in range(1, 11)]] + [
      [caption] + [f"{j}.wav" for j in best_first[i]]
      for i, caption in enumerate(["a dog", "rain", "a car"])]
  local = (tmp_path / "local" / "dcase_test.csv").read_bytes()
  assert emulator.read(f"{prefix}/dcase_test.csv") == local
  assert not [name for name in emulator.names(prefix) if ".partial-" in name]
  assert sorted(os.listdir(tmp_path)) == ["local"]  # nothing local in the bucket's name


def test_a_torn_metrics_line_in_the_bucket_is_dropped_with_a_warning(emulator, bucket, caplog):
  workdir, prefix = bucket
  files.write_text(f"{workdir}/metrics.jsonl", '{"epoch": 1}\n{"epoch": 2, "trai')
  assert files.read_jsonl(f"{workdir}/metrics.jsonl") == [{"epoch": 1}]
  assert f"{workdir}/metrics.jsonl:2: dropped a torn or partial line" in caplog.text
  with metrics_log.MetricsLog(workdir, completed_epochs=1) as log:
    log.write(30, dict(epoch=2, training=dict(loss=0.5)))
  assert emulator.read(f"{prefix}/metrics.jsonl") == b'{"epoch": 1}\n' + json.dumps(
      dict(epoch=2, training=dict(loss=0.5))).encode() + b"\n"


def test_a_bucket_cache_is_prepared_once_and_other_machines_download_it(
    emulator, bucket, tmp_path, monkeypatch):
  workdir, prefix = bucket
  cache = f"{workdir}/cache"
  first = corpus.load(cache_dir=cache, size="tiny", stage_dir=str(tmp_path / "machine_a"))
  uploaded = [name[len(f"{prefix}/cache/tfds/synthetic_tiny/"):]
              for name in emulator.names(f"{prefix}/cache/")]
  prepared_a = first.builder.data_dir.split("/ntxr_clotho/")[0]
  assert sorted(uploaded) == sorted(files.file_tree(prepared_a) + [staging.UPLOADED])
  assert any(name.startswith("tokenizers/spm_") for name in uploaded)

  def prepare_again(*args, **kwargs):
    raise AssertionError("a machine prepared the data again")
  monkeypatch.setattr(builders.NtxrClotho, "_generate_examples", prepare_again)
  copy_file, copied = files.copy_file, []
  def killed_after_two(source, destination):
    if len(copied) == 2:
      raise OSError("killed")
    copied.append(source)
    copy_file(source, destination)
  monkeypatch.setattr(files, "copy_file", killed_after_two)
  with pytest.raises(OSError, match="killed"):
    corpus.load(cache_dir=cache, size="tiny", stage_dir=str(tmp_path / "machine_b"))
  monkeypatch.setattr(files, "copy_file", copy_file)
  tfds_b = next((tmp_path / "machine_b").glob("cache-*")) / "tfds"
  assert [p.name for p in tfds_b.iterdir()] == [f"synthetic_tiny.partial-{os.getpid()}"]

  second = corpus.load(cache_dir=cache, size="tiny", stage_dir=str(tmp_path / "machine_b"))
  assert [p.name for p in tfds_b.iterdir()] == ["synthetic_tiny"]  # the partial removed
  prepared_b = second.builder.data_dir.split("/ntxr_clotho/")[0]
  assert files.file_tree(prepared_b) == files.file_tree(prepared_a)
  for split in first.splits:
    a = list(first.builder.as_dataset(split=split).as_numpy_iterator())
    b = list(second.builder.as_dataset(split=split).as_numpy_iterator())
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
      assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
  caption = "a dog barks while rain falls"
  assert np.array_equal(second.tokenizer.encode(caption), first.tokenizer.encode(caption))
  assert second.events == first.events


def test_a_run_in_a_bucket_is_killed_resumes_and_matches_a_local_run(
    emulator, tiny_flags, tiny_run, tmp_path, tmp_path_factory):
  """The cache is in the bucket too: the first run prepares and uploads it, the rerun
  stands for another machine, which downloads it."""
  env = dict(os.environ, EPATH_USE_TF="false", STORAGE_EMULATOR_HOST=emulator.url,
             TENSORSTORE_GCS_HTTP_URL=emulator.url, GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
             GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")  # no zonal-bucket probe per call
  command = [sys.executable, "-c", MAIN_PER_ARRAY, f"--workdir=gs://{BUCKET}/run"]
  flags = lambda **more: tiny_flags(cache_dir=f"gs://{BUCKET}/cache", **more)
  run = subprocess.Popen(command + flags(stage_dir=tmp_path_factory.mktemp("machine_a")),
                         cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
  try:  # a complete checkpoint 10 (Orbax marks one in a bucket with commit_success.txt)
    wait_for(lambda: emulator.names("run/checkpoints/latest/10/commit_success.txt"), [run], 300)
    time.sleep(0.5)
  finally:
    run.kill()
    run.wait()
  assert not emulator.names("run/results.json")
  prepared = "cache/tfds/synthetic_tiny"
  assert emulator.names(f"{prepared}/{staging.UPLOADED}")
  emulator.write(f"{prepared}/tokenizers/only_in_the_bucket.txt", b"a file to trace")

  stage_b = tmp_path_factory.mktemp("machine_b")
  rerun = subprocess.run(command + flags(stage_dir=stage_b,
                                          checkpoint_every_steps=1000),  # epochs' ends
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                         check=False)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert re.search(r" 10/15 \[00:00<\?", rerun.stderr)  # resumed at step 10
  assert "is in a bucket, where a run cannot lock its workdir" in rerun.stderr
  downloaded, = stage_b.glob("cache-*/tfds/synthetic_tiny/tokenizers/only_in_the_bucket.txt")
  assert downloaded.read_bytes() == b"a file to trace"
  straight = json.loads((pathlib.Path(tiny_run) / "results.json").read_text())
  resumed = json.loads(emulator.read("run/results.json"))
  straight, resumed = timeless(straight), timeless(resumed)
  assert flat(resumed) == flat(straight)
  metrics = emulator.read("run/metrics.jsonl").decode().splitlines()
  assert [json.loads(line)["epoch"] for line in metrics] == [1, 2]
  events = emulator.names("run/tensorboard/")
  assert events and all(emulator.read(name) for name in events)
  assert not [name for name in emulator.names("run/") if ".partial-" in name]
  assert os.listdir(tmp_path) == []
