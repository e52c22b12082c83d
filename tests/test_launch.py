"""The launch scripts' dry runs print exactly the commands they would run; they never
delete a run, and they need its workdir."""

import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--strategy=hard_cross", "--config.data_dir=/mnt/Clotho v2's copy", "--config.num_epochs=3",
         "--workdir=/mnt/shared/runs/hard_cross"]


def dry_run(script, *args, **env):
  result = subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args],
                          env=dict(os.environ, DRY_RUN="1", **env), capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stderr
  return result.stdout.splitlines()


def test_tpu_dry_run_ships_head_and_starts_every_worker(tmp_path):
  lines = dry_run("run_tpu.sh", "my-tpu", "us-central2-b", *FLAGS, TMPDIR=str(tmp_path))
  archive = str(tmp_path / "ntxr-my-tpu.tar.gz")
  assert [shlex.split(line) for line in lines[:2]] == [
      ["git", "-C", ROOT, "archive", "--format=tar.gz", "-o", archive, "HEAD"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, "my-tpu:ntxr.tar.gz",
       "--zone=us-central2-b", "--worker=all"]]
  ssh = shlex.split(lines[2])
  assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu",
                     "--zone=us-central2-b", "--worker=all"]
  assert len(lines) == 3 and len(ssh) == 9 and ssh[8].startswith("--command=")
  steps = [shlex.split(step) for step in ssh[8][len("--command="):].split(" && ")]
  commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
  assert steps[:3] == [["mkdir", "-p", f"ntxr-{commit}"],  # a folder per commit, kept
                       ["tar", "-xzf", "ntxr.tar.gz", "-C", f"ntxr-{commit}"],
                       ["cd", f"ntxr-{commit}"]]
  assert not any(step[0] == "rm" for step in steps)
  assert steps[-1] == ["python", "-m", "ntxr.main", "--distributed", *FLAGS]
  assert ["pip", "install", "-q", "-e", ".", "jax[tpu]>=0.10,<0.11"] in steps
  assert not os.path.exists(archive)  # a dry run makes nothing


def test_tpu_script_needs_a_name_and_zone():
  result = subprocess.run(["bash", os.path.join(ROOT, "launch", "run_tpu.sh"), "my-tpu"],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 2 and "usage:" in result.stderr


@pytest.mark.parametrize("partition", ["", "gpu-long"])
def test_slurm_dry_run_prints_the_batch_script(tmp_path, partition):
  lines = dry_run("run_slurm.sh", *FLAGS, NODES="4", GPUS_PER_NODE="2", TIME="2:00:00",
                  PARTITION=partition, VENV=str(tmp_path / "my venv"))
  assert lines[0] == "#!/bin/bash"
  directives = [l for l in lines if l.startswith("#SBATCH")]
  assert directives == ["#SBATCH --job-name=ntxr", "#SBATCH --nodes=4",
                        "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=2",
                        "#SBATCH --cpus-per-task=16", "#SBATCH --time=2:00:00",
                        f"#SBATCH --output={ROOT}/slurm-%j.out"] + (
                            [f"#SBATCH --partition={partition}"] if partition else [])
  commands = [shlex.split(l) for l in lines if l and not l.startswith("#")]
  assert commands[-3:] == [["cd", ROOT], [".", str(tmp_path / "my venv" / "bin" / "activate")],
                           ["srun", "python", "-m", "ntxr.main", "--distributed", *FLAGS]]


def test_slurm_without_a_venv_says_how_to_make_one(tmp_path):
  result = subprocess.run(["bash", os.path.join(ROOT, "launch", "run_slurm.sh"), *FLAGS],
                          env=dict(os.environ, VENV=str(tmp_path / "none")),
                          capture_output=True, text=True, check=False)
  assert result.returncode == 1 and f"no venv at {tmp_path}/none" in result.stderr


@pytest.mark.parametrize("script, args", [("run_tpu.sh", ["my-tpu", "us-central2-b"]),
                                          ("run_slurm.sh", [])])
def test_a_launch_without_a_workdir_is_refused(script, args):
  result = subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args, *FLAGS[:3]],
                          env=dict(os.environ, DRY_RUN="1"), capture_output=True, text=True,
                          check=False)
  assert result.returncode == 2 and result.stdout == ""
  assert "error: pass --workdir=PATH" in result.stderr and "resumes the run" in result.stderr


@pytest.mark.parametrize("script, args", [("run_slurm.sh", []),
                                          ("run_tpu.sh", ["my-tpu", "us-central2-b"])])
def test_a_bad_setting_stops_the_launch_in_one_line(tmp_path, script, args):
  """Checked here, with this Python's ntxr, before anything is printed or shipped."""
  path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"
  result = subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args,
                           "--workdir=/mnt/shared/runs/x", "--config.learning_rate=inf"],
                          env=dict(os.environ, DRY_RUN="1", TMPDIR=str(tmp_path), PATH=path,
                                   VENV=str(tmp_path / "none")),
                          capture_output=True, text=True, check=False)
  assert (result.returncode, result.stdout, result.stderr) == (
      2, "", "error: --config.learning_rate must be a finite number, not inf\n")
