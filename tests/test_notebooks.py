"""The notebooks run from top to bottom on a tiny sweep and a tiny benchmark."""

import os
import shutil

import nbclient
import nbformat
import pytest

from ntxr import files
from ntxr.bench import kernels

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


def test_ablation_notebook(tiny_sweep, monkeypatch):
  monkeypatch.setenv("NTXR_SWEEP", tiny_sweep)
  setup, table, *figures = execute("ablation.ipynb")
  assert text(setup).strip() == f"4 finished runs in {tiny_sweep}"
  assert [line.split(" |")[0] for line in text(table).splitlines()[2:]] == [
      "| random", "| semihard_cross"]
  assert [images(f) for f in figures] == [1, 1, 1, 1]


def test_kernel_notebook(tmp_path, monkeypatch):
  rows = kernels.run([(8, 5, 3, 4), (16, 5, 3, 4)], ["random", "hard_cross"], "float32",
                     repeats=1, loop_max_n=0, torch_loop=False)
  for device in ("a", "b"):  # what `python -m ntxr.bench --json=...` writes on two devices
    files.write_json(f"{tmp_path}/bench_{device}.json", dict(device=f"cpu {device}", loss=rows))
  monkeypatch.setenv("NTXR_BENCH", str(tmp_path / "bench_*.json"))
  setup, figure = execute("kernels.ipynb")
  assert text(setup).splitlines() == [f"{tmp_path}/bench_a.json: cpu a, 4 rows",
                                      f"{tmp_path}/bench_b.json: cpu b, 4 rows"]
  assert images(figure) == 1


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
