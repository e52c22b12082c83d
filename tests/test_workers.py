"""Worker processes end with their run, however it ends, and load only what they need.
(A run killed while preparing: test_workdir.py.)"""

import ast
import os
import signal
import subprocess
import sys
import textwrap
import time

from ntxr.data import workers
from processes import alive, descendants, outliving

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_command_started_as_a_sweep_starts_its_runs_ends_with_its_launcher(tmp_path):
  parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
      import subprocess, sys, time
      from ntxr import lifetime
      child = subprocess.Popen(
          [sys.executable, "-c", "from ntxr import lifetime; import time; "
           "lifetime.die_with_launcher(); time.sleep(120)"],
          env=lifetime.launcher_environment())
      print(child.pid, flush=True)
      time.sleep(120)
  """)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  child = int(parent.stdout.readline())
  time.sleep(2)  # the child has started and asked to die with its launcher
  assert alive([child])
  parent.send_signal(signal.SIGKILL)
  parent.wait()
  assert not outliving([child], timeout=1)


def probe(_) -> tuple:
  """(the process that ran the job, which heavy modules it has loaded)."""
  return os.getpid(), tuple(sorted(m for m in ("tensorflow", "jax") if m in sys.modules))


def sleep_then_pid(seconds: float) -> int:
  time.sleep(seconds)
  return os.getpid()


def run_script(tmp_path, body: str) -> subprocess.Popen:
  """A Python script, with this folder importable, started from the repository."""
  script = tmp_path / "script.py"
  script.write_text(f"import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
                    + textwrap.dedent(body))
  return subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_pool_workers_do_not_import_the_parents_main_module_and_few_jobs_run_here(tmp_path):
  script = run_script(tmp_path, """
      import os
      import jax  # a heavy __main__, as ntxr.main is
      import test_workers
      from ntxr.data import workers
      if __name__ == "__main__":
        print(os.getpid())
        with workers.imap(test_workers.probe, range(4), processes=2) as results:
          print(list(results))
        with workers.imap(test_workers.probe, range(3)) as results:  # too few for a worker
          print(list(results))
  """)
  out, err = script.communicate(timeout=300)
  assert script.returncode == 0, err[-2000:]
  parent, pooled, here = out.splitlines()
  pooled, here = ast.literal_eval(pooled), ast.literal_eval(here)
  assert all(modules == () for _, modules in pooled)  # workers: no TensorFlow, no JAX
  assert int(parent) not in {pid for pid, _ in pooled}
  assert here == [(int(parent), ("jax",))] * 3


def test_pool_workers_end_when_their_parent_is_killed_mid_job(tmp_path):
  script = run_script(tmp_path, """
      import test_workers
      from ntxr.data import workers
      if __name__ == "__main__":
        with workers.imap(test_workers.sleep_then_pid, [0, 0, 120, 120], processes=2) as pids:
          for pid in pids:
            print(pid, flush=True)
  """)
  try:
    first = int(script.stdout.readline())  # the pool is up and two jobs are done
    pool = descendants(script.pid)  # the two workers and multiprocessing's resource tracker
  finally:
    script.kill()
    script.wait()
  assert first in pool and len(pool) == 3
  assert not outliving(pool)


def test_pool_workers_leave_ctrl_c_to_their_parent():
  """A terminal sends Ctrl-C to every process of the command: workers ignore it (no
  KeyboardInterrupt of theirs is printed), and end as their parent ends."""
  with workers.imap(signal.getsignal, [signal.SIGINT] * 2, processes=2) as handlers:
    assert list(handlers) == [signal.SIG_IGN] * 2
