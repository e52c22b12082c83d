"""Shared fixtures: tiny configs on a tiny synthetic corpus, and a tiny sweep of them.

The suite runs in two worker processes (pytest-xdist). Compiling, not running, is
most of its time, so XLA's CPU backend compiles without its LLVM optimisations and
with its older elemental emitters in place of its fusion emitters (the tiny train step
compiles in about half the time and runs about as fast), and the workers and every process
a test starts share one JAX compilation cache, made for the session and removed after
it: a step compiled once is not compiled again in another process.
"""

import os
import shutil
import sys
import tempfile

FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
XLA_DEFAULTS = "NTXR_TEST_XLA_DEFAULTS"  # set: compile as users do (test_xla_defaults.py)
for flag in () if os.environ.get(XLA_DEFAULTS) else FAST_COMPILE:  # inherited by subprocesses
  if flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
# ntxr never uses Keras, which `import tensorflow` loads (scikit-learn with it) unless
# tf.keras is pointed at tf_keras, not installed: seconds of every process's start-up.
os.environ["TF_USE_LEGACY_KERAS"] = "1"

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from ntxr.configs import default  # pylint: disable=wrong-import-position

# One frame bucket (the tiny clips are 3-6 s): each step compiles once per setting.
TINY = dict(size="tiny", batch_size=8, num_epochs=2, channels=(4, 8, 8, 8, 8), embed_dim=16,
            vocab_size=60, checkpoint_every_steps=10, eval_batch_size=8, frame_buckets=(320,))
SWEEP_STRATEGIES = ("random", "semihard_cross")
COMPILATION_CACHE = "JAX_COMPILATION_CACHE_DIR"
collect_ignore = ["authors"]  # the authors' code as published, which test_authors_crnn loads
CACHE_OWNER = pytest.StashKey[str]()  # the cache this process made and removes


def pytest_configure(config):
  """The session's compilation cache: made by the first process, inherited by the rest.
  JAX reads it from the environment when first imported, after this: this module leaves
  JAX, TensorFlow and ntxr's training to the fixtures, so that the pytest-xdist
  controller, which runs no test, starts the workers without importing them (4 s)."""
  assert "jax" not in sys.modules, "JAX was imported before the compilation cache was set"
  if COMPILATION_CACHE not in os.environ:
    os.environ[COMPILATION_CACHE] = tempfile.mkdtemp(prefix="ntxr-tests-jax-cache-")
    config.stash[CACHE_OWNER] = os.environ[COMPILATION_CACHE]
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"


def pytest_unconfigure(config):
  if CACHE_OWNER in config.stash:
    shutil.rmtree(config.stash[CACHE_OWNER], ignore_errors=True)


def shared_path(tmp_path_factory, name: str) -> str:
  """A path in this session's temporary folder, the same in every worker process."""
  base = tmp_path_factory.getbasetemp()
  return str((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name)


@pytest.fixture(scope="session")
def made_once(tmp_path_factory):
  """made_once(name, make): the path of the file make(path) writes, made by one worker
  for the session while the others wait (a lock beside it), whichever worker asks first."""
  from ntxr import files  # pylint: disable=import-outside-toplevel
  def made(name: str, make) -> str:
    path = shared_path(tmp_path_factory, name)
    with files.locked(f"{path}.lock", wait=True):
      if not os.path.exists(path):
        stem, extension = os.path.splitext(path)
        partial = f"{stem}.partial{extension}"  # whole or absent
        make(partial)
        os.replace(partial, path)
    return path
  return made


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """The workers' one cache: the corpus is generated and prepared once (under a lock)."""
  path = shared_path(tmp_path_factory, "cache")
  os.makedirs(path, exist_ok=True)
  return path


@pytest.fixture(scope="session")
def tiny_config(cache_dir):
  """tiny_config(**overrides): the default config shrunk to seconds of training."""
  def make(**overrides):
    config = default.get_config()
    config.update({**TINY, "cache_dir": cache_dir, **overrides})
    return config
  return make


@pytest.fixture(scope="session")
def tiny_flags(cache_dir):
  """tiny_flags(**overrides): the same shrunk config as `ntxr.main` flags."""
  def make(**overrides):
    return [f"--config.{field}={value}"
            for field, value in {**TINY, "cache_dir": cache_dir, **overrides}.items()]
  return make


def _train_once(root: str, run, tiny_config) -> None:
  """Trains one of the tiny sweep's runs (a sweep.Run) unless a worker has: each run has
  its own lock (beside the sweep), so that two workers asking for the sweep at once train
  different runs."""
  from ntxr import files, train  # pylint: disable=import-outside-toplevel
  lock = os.path.join(f"{root}-locks", f"{run.name}_seed_{run.seed}")
  with files.locked(lock, wait=True):
    if not run.tested:
      train.train_and_evaluate(tiny_config(strategy=run.name, seed=run.seed), run.workdir)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_config):
  """The workdir of a finished run of tiny_config() (semihard_cross, seed 0), trained
  once for the whole session: the tiny sweep's."""
  from ntxr import sweep  # pylint: disable=import-outside-toplevel
  root = shared_path(tmp_path_factory, "sweep")
  run, = [r for r in sweep.plan(root, SWEEP_STRATEGIES, [0, 1])
          if (r.name, r.seed) == ("semihard_cross", 0)]
  _train_once(root, run, tiny_config)
  return run.workdir


@pytest.fixture(scope="session")
def tiny_sweep(tiny_run, tiny_config):
  """A sweep root with SWEEP_STRATEGIES x seeds 0 and 1, trained once for the session;
  the second worker goes through the runs in the other order."""
  from ntxr import sweep  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(tiny_run))
  runs = sweep.plan(root, SWEEP_STRATEGIES, [0, 1])
  for run in runs[::-1] if os.environ.get("PYTEST_XDIST_WORKER") == "gw1" else runs:
    _train_once(root, run, tiny_config)
  return root


@pytest.fixture(scope="session")
def apart_and_together(tmp_path_factory, tiny_config):
  """(apart, together): together_plan's runs trained apart (ntxr.train) and together
  (ntxr.train.train_runs), each [(config, workdir)], once for the session. The second
  worker trains the together runs while the first trains the separate ones."""
  # pylint: disable=import-outside-toplevel
  from ntxr import files, train
  from runs import together_plan
  root = shared_path(tmp_path_factory, "together")
  apart = together_plan(os.path.join(root, "apart"), tiny_config)
  joined = together_plan(os.path.join(root, "together"), tiny_config)
  finished = lambda runs: all(os.path.exists(os.path.join(w, "results.json")) for _, w in runs)
  def train_apart():
    for config, workdir in apart:
      with files.locked(os.path.join(f"{root}-locks", os.path.relpath(workdir, root)),
                        wait=True):
        if not finished([(config, workdir)]):
          train.train_and_evaluate(config, workdir)
  def train_joined():
    with files.locked(os.path.join(f"{root}-locks", "together"), wait=True):
      if not finished(joined):
        train.train_runs(joined)
  for step in ((train_joined, train_apart) if os.environ.get("PYTEST_XDIST_WORKER") == "gw1"
               else (train_apart, train_joined)):
    step()
  return apart, joined
