"""The commands' shared flags and start: names without JAX, a quiet and light --help."""

import subprocess
import sys

from ntxr import cli, objectives, sampling


def test_flag_names_are_the_registries_names():
  assert cli.STRATEGY_NAMES == tuple(sampling.STRATEGIES)
  assert cli.OBJECTIVE_NAMES == tuple(objectives.OBJECTIVES)


def test_main_help_prints_only_the_help_and_imports_neither_jax_nor_tensorflow():
  code = ("import runpy, sys\n"
          "try: runpy.run_module('ntxr.main', run_name='__main__', alter_sys=True)\n"
          "except SystemExit: pass\n"
          "loaded = [m for m in ('jax', 'tensorflow', 'librosa') if m in sys.modules]\n"
          "assert not loaded, loaded")
  done = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True,
                        text=True, check=True)
  assert done.stderr == ""
  assert done.stdout.startswith("Trains and evaluates a dual encoder")
  assert "--strategy:<easy_audio|easy_text|full_batch|hard_audio|hard_cross|hard_text|" \
      "random|semihard_cross>" in "".join(done.stdout.split())
