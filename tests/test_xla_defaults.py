"""The suite compiles with XLA's LLVM optimisations off (conftest.py); users compile with
XLA's defaults. A few numeric tests (scores, selection and the loss, a training step's
loss from the encoders' output) run again here, once, in a process that
compiles as users do. The whole step with the CRNN is left out: under the defaults its
compilation alone takes half a minute of the suite's six."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMERIC = ("tests/test_scores.py::test_alignment_matches_naive_loop_with_masks",
           "tests/test_sampling.py::test_selection_and_loss_match_the_reference_loop",
           "tests/test_train.py::test_batch_padding_reproduces_the_authors_training_score")


def test_numeric_tests_pass_under_xla_default_compiler_settings():
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR", "PYTEST_XDIST_WORKER")}
  env["NTXR_TEST_XLA_DEFAULTS"] = "1"
  code = ("import os, sys, pytest\n"
          "flags = os.environ.get('XLA_FLAGS', '')\n"
          "assert 'optimization_level' not in flags and 'fusion_emitters' not in flags, flags\n"
          "sys.exit(pytest.main(sys.argv[1:]))")
  done = subprocess.run([sys.executable, "-c", code, "-q", "-p", "no:cacheprovider",
                         "-o", "addopts=", "--import-mode=importlib", *NUMERIC],
                        cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-500:]
