"""The README and docs/: short README, links that resolve, the strategies and objectives
they list the specified ones, the benchmark page and the result tables made from their
files; the package's metadata: the paper cited alike everywhere, the Python versions and
accelerator extras those of the JAX it requires."""

import configparser
import csv
import glob
import importlib.metadata
import itertools
import json
import os
import re

from packaging import requirements, specifiers
import yaml

from ntxr import specs
from ntxr.bench import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: str) -> set:
  """GitHub's heading anchors of a Markdown file."""
  with open(path, encoding="utf-8") as f:
    headings = [line.lstrip("#").strip() for line in f if line.startswith("#")]
  return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_readme_fits_a_short_read():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    assert len(f.read().splitlines()) <= 300


def test_every_relative_link_resolves():
  assert len(PAGES) >= 7
  broken = []
  for page in PAGES:
    with open(page, encoding="utf-8") as f:
      text = f.read()
    for target in LINK.findall(text):
      if re.match(r"[a-z]+://", target):
        continue
      path, _, anchor = target.partition("#")
      resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
      if not os.path.exists(resolved) or (anchor and anchor not in anchors(resolved)):
        broken.append(f"{os.path.relpath(page, ROOT)}: {target}")
  assert not broken, broken


def read(name: str) -> str:
  with open(os.path.join(ROOT, name), encoding="utf-8") as f:
    return f.read()


RESULTS = os.path.join(ROOT, "docs", "results")
# A results.md table made from a sweep's results.csv follows a line naming it.
TABLE_SOURCE = re.compile(r"^<!-- made from docs/results/(\w+)/results\.csv -->$", re.M)


def _cells(line: str) -> list:
  return [cell.strip() for cell in line.strip().strip("|").split("|")]


def first_table(text: str) -> tuple:
  """(header cells, [row cells]) of the first Markdown table in text."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("| "))
  end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
  return _cells(lines[start]), [_cells(line) for line in lines[start + 2:end]]


def assert_made_from(table: tuple, sweep_name: str) -> None:
  """Every row of the table is its strategy's (or objective's, named in its first cell)
  row of docs/results/SWEEP/results.csv: each metric column its mean ± sample standard
  deviation to 3 decimals, the collapse column collapsed seeds / seeds."""
  with open(os.path.join(RESULTS, sweep_name, "results.csv"), encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  header, body = table
  assert body, sweep_name
  for cells in body:
    row, = [r for r in rows if re.search(rf"\b{r['strategy']}\b", cells[0])]
    checked = 0
    for column, cell in zip(header[1:], cells[1:]):
      if column in ("collapse", "collapsed"):
        assert cell == f"{row['collapsed']}/{row['seeds']}", (sweep_name, cells[0], column)
      elif f"{column} mean" in row:
        mean, spread = float(row[f"{column} mean"]), float(row[f"{column} std"])
        assert cell == f"{mean:.3f} ± {spread:.3f}", (sweep_name, cells[0], column)
        checked += 1
    assert checked >= 2, (sweep_name, header)


def test_the_result_tables_are_made_from_their_csvs():
  """README's two tables (the ablation's, the objectives') and every table results.md
  says it made from a sweep's results.csv; every sweep under docs/results has one (its
  other folders hold one run: results.json), and its provenance.json: the sweep's
  command, and the commits and dates of as many runs as the table counts seeds."""
  readme = read("README.md").split("\n## Results\n")[1].split("\n## ")[0]
  ablation, objectives = readme.split("\n\n| objective")
  assert_made_from(first_table(ablation), "ablation")
  assert_made_from(first_table("| objective" + objectives), "objectives")
  text = read("docs/results.md")
  made = TABLE_SOURCE.findall(text)
  sweeps = [name for name in os.listdir(RESULTS)
            if not os.path.exists(os.path.join(RESULTS, name, "results.json"))]
  assert sorted(made) == sorted(sweeps)
  for name in sweeps:
    with open(os.path.join(RESULTS, name, "provenance.json"), encoding="utf-8") as f:
      made_by = json.load(f)
    with open(os.path.join(RESULTS, name, "results.csv"), encoding="utf-8") as f:
      seeds = sum(int(row["seeds"]) for row in csv.DictReader(f))
    assert made_by["command"].startswith("python -m ntxr.sweep --root="), name
    assert made_by["runs"]["count"] == seeds and made_by["runs"]["commits"], name
    assert made_by["runs"]["first"] <= made_by["runs"]["last"] <= made_by["tabulated"], name
  for match in TABLE_SOURCE.finditer(text):
    assert_made_from(first_table(text[match.end():]), match.group(1))


def listed(lines) -> list:
  """The `names` in code quotes of the lines, in order."""
  return re.findall(r"`(\w+)`", " ".join(lines))


def first_column(text: str, header: str) -> list:
  """The first cells of the Markdown table whose header row starts with `header`."""
  table = itertools.dropwhile(lambda line: not line.startswith(header), text.splitlines())
  rows = itertools.takewhile(lambda line: line.startswith("|"), itertools.islice(table, 2, None))
  return [row.split("|")[1] for row in rows]


def test_the_default_runs_printout_is_the_committed_runs():
  """README's printout of its first command is what `ntxr.main` prints from the run kept
  in docs/results/default (its metrics.jsonl, and its results.json, which names its
  commit)."""
  from ntxr import evaluate, train  # pylint: disable=import-outside-toplevel  (JAX)
  folder = os.path.join(ROOT, "docs", "results", "default")
  with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
    run = json.load(f)
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    printout = f.read().split("and prints:\n\n```\n", 1)[1].split("\n```", 1)[0]
  first, *lines = printout.splitlines()
  assert first.startswith("Preparing log-mel features (")
  assert lines == [*map(train.epoch_line, records), "", *evaluate.report(
      "semihard_cross", run, "workdir/semihard_cross/results.json").splitlines()]
  assert run["provenance"]["commit"] and not run["provenance"]["commit"].endswith("+changes")


def test_the_docs_list_each_specified_strategy_and_objective_once():
  design = read("docs/design.md")
  assert sorted(listed(first_column(design, "| name | audio negative"))) == sorted(
      specs.STRATEGIES)
  assert sorted(listed(first_column(design, "| objective | per anchor"))) == sorted(
      specs.OBJECTIVES)
  section = read("README.md").split("## Strategies and objectives\n")[1].splitlines()
  bullets = itertools.takewhile(lambda line: line.startswith(("- ", "  ")),
                                itertools.dropwhile(lambda line: not line.startswith("- "),
                                                    section))
  assert sorted(listed(bullets)) == sorted(specs.run_settings())


def test_benchmark_page_is_made_from_the_committed_results():
  found = results.read(os.path.join(ROOT, "docs", "benchmarks"))
  assert {r["job"] for r in found} == set(results.JOB_TITLES)
  assert all(r["date"] and r["versions"]["jax"] and r["command"].startswith("python -m ntxr.bench")
             for r in found)
  with open(os.path.join(ROOT, "docs", "benchmarks.md"), encoding="utf-8") as f:
    committed = f.read()
  figures = dict(re.findall(r"!\[([^\]]+)\]\(([^)]+)\)", committed))
  assert committed == results.page(found, figures)


def setup_cfg() -> configparser.ConfigParser:
  config = configparser.ConfigParser()
  config.read(os.path.join(ROOT, "setup.cfg"), encoding="utf-8")
  return config


def test_the_paper_is_cited_by_its_doi_everywhere():
  doi = "10.1109/ICASSP49357.2023.10095319"
  with open(os.path.join(ROOT, "CITATION.cff"), encoding="utf-8") as f:
    paper = yaml.safe_load(f)["preferred-citation"]
  assert paper["doi"] == doi and {"type": "doi", "value": doi} in paper["identifiers"]
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    bibtex = f.read().split("```bibtex")[1].split("```")[0]
  assert re.search(r"doi\s*=\s*\{" + re.escape(doi) + "}", bibtex)
  urls = dict(line.split(" = ") for line in
              setup_cfg()["metadata"]["project_urls"].strip().splitlines())
  assert urls == {"Paper": f"https://doi.org/{doi}",
                  "Reference code": "https://github.com/xieh97/contrastive-negative-sampling"}


def test_python_versions_and_extras_follow_the_jax_required():
  config = setup_cfg()
  required = {r.name: r for r in map(requirements.Requirement,
                                     config["options"]["install_requires"].split())}
  jax = importlib.metadata.metadata("jax")
  assert required["jax"].specifier.contains(jax["Version"])
  ours = specifiers.SpecifierSet(config["options"]["python_requires"])
  theirs = specifiers.SpecifierSet(jax["Requires-Python"])
  listed = [c.rsplit(" :: ", 1)[1] for c in config["metadata"]["classifiers"].split("\n")
            if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c.strip())]
  assert listed and all(v in ours and v in theirs for v in listed)
  below = f"3.{int(listed[0].split('.')[1]) - 1}"  # the version before the first listed
  assert below not in ours and below not in theirs
  extras = config["options.extras_require"]
  for extra, jax_extra in (("cuda", "cuda12"), ("tpu", "tpu")):
    given = requirements.Requirement(extras[extra].strip())
    assert (given.name, given.extras, given.specifier) == (
        "jax", {jax_extra}, required["jax"].specifier)
    assert jax_extra in jax.get_all("Provides-Extra")
