"""benchmarks/readme.py: the README tables come from the last committed benchmark run."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import readme  # noqa: E402

PAGE = "a\n<!-- begin:x -->\nold\n<!-- end:x -->\nb\n<!-- begin:y -->\nkeep\n<!-- end:y -->\n"


@pytest.fixture
def page(tmp_path, monkeypatch):
    """A README of our own, with benchmarks/results beside it: the real one is never touched."""
    path = tmp_path / "README.md"
    path.write_text(PAGE)
    monkeypatch.setattr(readme, "README", path)
    monkeypatch.setattr(readme, "RESULTS", tmp_path / "benchmarks" / "results")
    return path


def test_insert_replaces_only_the_named_block(page):
    assert readme.insert("x", "new\n")
    assert page.read_text() == PAGE.replace("old", "new")
    assert not readme.insert("z", "nothing")  # no markers: untouched, and says so
    assert page.read_text() == PAGE.replace("old", "new")


def test_only_the_committed_results_update_the_readme(page, tmp_path):
    assert not readme.insert_if_committed("x", "trial numbers", tmp_path / "elsewhere")
    assert page.read_text() == PAGE
    assert readme.insert_if_committed("x", "committed numbers", readme.RESULTS)
    assert "committed numbers" in page.read_text()
