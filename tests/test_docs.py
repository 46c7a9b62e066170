"""The README is a front door and the docs hold together: the README stays short and in the
order a newcomer reads it, every link between the pages resolves, no page cites a commit, and
docs/benchmarks.md is exactly what benchmarks/make_docs.py writes from the committed results."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_is_a_front_door_in_a_newcomers_order():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    sections = re.findall(r"^## (.+)$", text, flags=re.M)
    order = ["Set-up", "Installing", "Quickstart", "Your own model and data", "A pipeline config",
             "The Python API", "Errors and exit codes", "Current limits", "More"]
    found = [next(i for i, s in enumerate(sections) if s.startswith(name)) for name in order]
    assert found == sorted(found), sections


def anchor(heading: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if fragment:
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
            assert fragment in {anchor(h) for h in headings}, f"{page.name}: no heading for #{fragment}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_page_cites_a_commit(page):
    hashes = [w for w in re.findall(r"\b[0-9a-f]{7,40}\b", page.read_text())
              if re.search(r"[a-f]", w) and re.search(r"[0-9]", w)]
    assert not hashes, f"{page.name} cites {hashes}"


def test_the_benchmarks_page_is_generated_from_the_committed_results():
    spec = importlib.util.spec_from_file_location("make_docs", ROOT / "benchmarks" / "make_docs.py")
    make_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_docs)
    results = ROOT / "benchmarks" / "results"
    assert list(results.glob("*.json")), "no results files committed"
    assert (ROOT / "docs" / "benchmarks.md").read_text() == make_docs.render(results), \
        "docs/benchmarks.md differs from `python benchmarks/make_docs.py`: regenerate it"
