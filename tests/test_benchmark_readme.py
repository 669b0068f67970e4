"""benchmarks/readme.py: the README tables come from the last committed benchmark run."""

import pytest

from benchmarks import readme

PAGE = "a\n<!-- begin:x -->\nold\n<!-- end:x -->\nb\n<!-- begin:y -->\nkeep\n<!-- end:y -->\n"


@pytest.fixture
def page(tmp_path, monkeypatch):
    """A README of our own, with benchmarks/results beside it: the real one is never touched."""
    path = tmp_path / "README.md"
    path.write_text(PAGE)
    monkeypatch.setattr(readme, "README", path)
    monkeypatch.setattr(readme, "RESULTS", tmp_path / "benchmarks" / "results")
    monkeypatch.setattr(readme, "DOCS", tmp_path / "docs")
    (tmp_path / "docs" / "guides").mkdir(parents=True)
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


def test_a_table_that_moved_to_a_docs_page_is_updated_there(page, tmp_path):
    doc = tmp_path / "docs" / "guides" / "perf.md"
    doc.write_text("# Perf\n<!-- begin:w -->\nold\n<!-- end:w -->\n")
    assert readme.insert("w", "new")
    assert doc.read_text() == "# Perf\n<!-- begin:w -->\nnew\n<!-- end:w -->\n"
    assert page.read_text() == PAGE
