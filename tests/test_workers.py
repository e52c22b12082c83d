"""Worker processes end with their run, however it ends, and load only what they need.
(A run killed while preparing: test_workdir.py.)"""

import os
import signal
import subprocess
import sys
import textwrap
import time

from ntxr.data import workers
from processes import alive, descendants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_command_started_as_a_sweep_starts_its_runs_ends_with_its_launcher(tmp_path):
  parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
      import subprocess, sys, time
      from ntxr.data import workers
      child = subprocess.Popen(
          [sys.executable, "-c", "from ntxr.data import workers; import time; "
           "workers.die_with_launcher(); time.sleep(120)"],
          env=workers.launcher_environment())
      print(child.pid, flush=True)
      time.sleep(120)
  """)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  child = int(parent.stdout.readline())
  time.sleep(2)  # the child has started and asked to die with its launcher
  assert alive([child])
  parent.send_signal(signal.SIGKILL)
  parent.wait()
  time.sleep(1)
  assert not alive([child])


def probe(_) -> tuple:
  return tuple(sorted(m for m in ("tensorflow", "jax") if m in sys.modules))


def test_pool_workers_do_not_import_the_parents_main_module(tmp_path):
  script = tmp_path / "heavy_main.py"
  script.write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {os.path.dirname(__file__)!r})
      import jax  # a heavy __main__, as ntxr.main is
      import test_workers
      from ntxr.data import workers
      if __name__ == "__main__":
        with workers.pool(2) as pool:
          print(pool.map(test_workers.probe, range(2)))
  """))
  out = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[(), ()]"
