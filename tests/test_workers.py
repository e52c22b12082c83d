"""Worker processes end with their run, however it ends, and load only what they need."""

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

from ntxr.data import workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def descendants(pid: int) -> set:
  """Every live process below pid (from /proc)."""
  parents = {}
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/stat") as f:
        parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
      continue
  found, frontier = set(), {pid}
  while frontier:
    frontier = {child for child, parent in parents.items() if parent in frontier} - found
    found |= frontier
  return found


def alive(pids) -> set:
  def running(pid):
    try:
      with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
      return False
  return {pid for pid in pids if running(pid)}


def test_a_run_killed_while_preparing_leaves_no_worker_and_a_rerun_completes(tmp_path):
  cache = tmp_path / "cache"
  command = [sys.executable, "-m", "ntxr.data.prepare", f"--config.cache_dir={cache}",
             "--config.size=tiny", "--config.vocab_size=60", "--config.batch_size=8"]
  run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
  deadline, started = time.monotonic() + 300, set()
  while time.monotonic() < deadline and run.poll() is None:
    started |= descendants(run.pid)
    if len(started) >= 2 and glob.glob(str(cache / "tfds" / "*" / "*" / "*" / "incomplete*")):
      break  # feature workers are up and TFDS is writing: the middle of preparation
    time.sleep(0.02)
  assert run.poll() is None, "preparation ended before it could be interrupted"
  started |= descendants(run.pid)
  run.send_signal(signal.SIGKILL)
  run.wait()
  time.sleep(3)
  assert not alive(started), "worker processes outlived their run"
  rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert "prepare:" in rerun.stdout and "skipped clips or rows: 0" in rerun.stdout


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
