"""The README and docs/: short README, links that resolve, the benchmark page made from
its result files."""

import glob
import os
import re

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


def test_benchmark_page_is_made_from_the_committed_results():
  found = results.read(os.path.join(ROOT, "docs", "benchmarks"))
  assert {r["job"] for r in found} == set(results.JOB_TITLES)
  assert all(r["date"] and r["versions"]["jax"] and r["command"].startswith("python -m ntxr.bench")
             for r in found)
  with open(os.path.join(ROOT, "docs", "benchmarks.md"), encoding="utf-8") as f:
    committed = f.read()
  figures = dict(re.findall(r"!\[([^\]]+)\]\(([^)]+)\)", committed))
  assert committed == results.page(found, figures)
