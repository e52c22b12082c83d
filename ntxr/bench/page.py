"""Writes docs/benchmarks.md, and its figures, from the result files in docs/benchmarks/.

  python -m ntxr.bench.page
"""

import os

from absl import app
from absl import flags

from ntxr import command, files, plots
from ntxr.bench import results as results_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("results_dir", "docs/benchmarks", "the result files")
  flags.DEFINE_string("page", "docs/benchmarks.md", "the page to write")


def main(argv):
  command.start(argv)
  results = results_lib.read(FLAGS.results_dir)
  if not results:
    command.exit_with(f"--results_dir={FLAGS.results_dir}: no result files", 2)
  docs = os.path.dirname(os.path.abspath(FLAGS.page))
  figures = {}
  kernels = [r for r in results if r["job"] == "kernels"]
  if kernels:
    files.makedirs(os.path.join(docs, "figures"))
    for name, draw in (("speedup by strategy", plots.speedup_by_strategy),
                       ("kernel time by device", plots.kernel_times)):
      path = os.path.join(docs, "figures", results_lib.slug(name) + ".png")
      plots.write_png(draw(kernels), path, dpi=120)
      figures[name] = os.path.relpath(path, docs)
  files.write_text(FLAGS.page, results_lib.page(results, figures))
  print(f"{FLAGS.page}: {len(results)} result files")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=command.parse_flags)
