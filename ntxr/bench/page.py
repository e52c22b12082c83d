"""Writes docs/benchmarks.md, and its figures, from the result files in docs/benchmarks/.

  python -m ntxr.bench.page
"""

import os

from absl import app
from absl import flags

from ntxr import command, files, plots
from ntxr.bench import results as results_lib

_RESULTS_DIR = flags.DEFINE_string("results_dir", "docs/benchmarks", "the result files")
_PAGE = flags.DEFINE_string("page", "docs/benchmarks.md", "the page to write")


def main(argv):
  command.start(argv)
  results = results_lib.read(_RESULTS_DIR.value)
  if not results:
    raise app.UsageError(f"no result files in {_RESULTS_DIR.value}")
  docs = os.path.dirname(os.path.abspath(_PAGE.value))
  figures = {}
  kernels = [r for r in results if r["job"] == "kernels"]
  if kernels:
    files.makedirs(os.path.join(docs, "figures"))
    for name, draw in (("speedup by strategy", plots.speedup_by_strategy),
                       ("kernel time by device", plots.kernel_times)):
      path = os.path.join(docs, "figures", results_lib.slug(name) + ".png")
      plots.write_png(draw(kernels), path, dpi=120)
      figures[name] = os.path.relpath(path, docs)
  files.write_text(_PAGE.value, results_lib.page(results, figures))
  print(f"{_PAGE.value}: {len(results)} result files")


if __name__ == "__main__":
  app.run(main)
