"""The notebooks run from top to bottom on a tiny sweep, a tiny benchmark and a tiny run,
and are committed with their outputs."""

import os
import shutil
import tempfile

import nbclient
import nbformat

from ntxr import sweep
from ntxr.bench import kernels, results

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "notebooks")


def execute(name: str) -> list:
  """Runs notebooks/NAME in a fresh kernel; returns each code cell's outputs."""
  notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": NOTEBOOKS}}).execute()
  return [cell.outputs for cell in notebook.cells if cell.cell_type == "code"]


def images(outputs: list) -> int:
  return sum("image/png" in o.get("data", {}) for o in outputs)


def text(outputs: list) -> str:
  return "".join(o.get("text", "") + o.get("data", {}).get("text/markdown", "")
                 for o in outputs)


def stdout(outputs: list) -> str:
  return "".join(o["text"] for o in outputs if o.get("name") == "stdout")


def test_ablation_notebook(tiny_sweep, tiny_config, monkeypatch):
  sweep.write_report(tiny_sweep, tiny_config())
  monkeypatch.setenv("NTXR_SWEEP", tiny_sweep)
  setup, table, figure, sweep_figures = execute("ablation.ipynb")
  assert text(setup).strip() == f"4 runs of 2 strategies in {tiny_sweep}"
  assert [line.split(" |")[0] for line in text(table).splitlines()[2:]] == [
      "| random", "| semihard_cross"]
  assert images(figure) == 1 and images(sweep_figures) == len(sweep.FIGURES) - 1


def test_kernel_notebook(tmp_path, monkeypatch):
  rows = kernels.run([(8, 5, 3, 4), (16, 5, 3, 4)], ["random", "hard_cross"], "float32",
                     repeats=1, loop_max_n=0, torch_loop=False)
  for device in ("cpu: a", "gpu: b"):  # what `--results_dir` holds after runs on two devices
    results.write(str(tmp_path), "kernels", rows, results.provenance(device, ["--jobs=kernels"]))
  monkeypatch.setenv("NTXR_BENCH", str(tmp_path))
  setup, speedups, times, tables = execute("kernels.ipynb")
  assert [line.split(",")[0] for line in text(setup).splitlines()] == [
      "cpu: a: 4 rows", "gpu: b: 4 rows"]
  assert images(speedups) == 1 and images(times) == 1
  assert text(tables).count("| hard_cross | 16 | 5 | 3 | 4 |") == 2


def test_committed_notebooks_show_their_outputs_and_no_local_paths():
  local = [path for path in (os.path.dirname(NOTEBOOKS), os.path.expanduser("~"),
                              tempfile.gettempdir(), "site-packages") if len(path) > 1]
  for name in sorted(os.listdir(NOTEBOOKS)):
    if name.endswith(".ipynb"):
      notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
      for cell in notebook.cells:
        if cell.cell_type == "code":
          assert cell.execution_count and cell.outputs, f"{name}: a cell without its outputs"
          shown = text(cell.outputs) + "".join(
              o.get("data", {}).get("text/plain", "") + "".join(o.get("traceback", []))
              for o in cell.outputs)
          assert not [path for path in local if path in shown], (name, shown)


def test_search_notebook(tiny_run, cache_dir, tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  shutil.copytree(tiny_run, workdir)
  folder = os.path.join(cache_dir, "synthetic_tiny", "evaluation")
  monkeypatch.setenv("NTXR_WORKDIR", str(workdir))
  monkeypatch.setenv("NTXR_AUDIO", folder)
  setup, queries, best = execute("search.ipynb")
  assert stdout(setup).strip() == "8 files indexed, 0 skipped"
  tables = [o["data"]["text/markdown"] for o in queries]
  assert [t.split("\n")[0] for t in tables] == ["**a bell is ringing**", "**water is dripping**"]
  for table in tables:
    names = [row.strip("| ").split(" | ")[2] for row in table.splitlines()[4:]]
    assert len(names) == 5 and all(os.path.isfile(os.path.join(folder, n)) for n in names)
  assert best[0]["data"]["text/html"].lstrip().startswith("<audio")  # a player of the clip
  similar = stdout(best).strip().splitlines()
  assert len(similar) == 3 and all(os.path.isfile(os.path.join(folder, line.split()[1]))
                                   for line in similar)
