"""benchmarks/readme.py: the README tables come from the last committed benchmark run."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import readme  # noqa: E402


def test_insert_replaces_only_the_named_block(tmp_path):
    page = tmp_path / "README.md"
    page.write_text(
        "a\n<!-- begin:x -->\nold\n<!-- end:x -->\nb\n<!-- begin:y -->\nkeep\n<!-- end:y -->\n"
    )
    assert readme.insert("x", "new\n", page)
    assert page.read_text() == (
        "a\n<!-- begin:x -->\nnew\n<!-- end:x -->\nb\n<!-- begin:y -->\nkeep\n<!-- end:y -->\n"
    )
    assert not readme.insert("z", "nothing", page)  # no markers: untouched, and says so
    assert "nothing" not in page.read_text()


def test_a_trial_run_elsewhere_leaves_the_readme_alone(tmp_path):
    before = readme.README.read_text()
    assert not readme.insert_if_committed("speed", "trial numbers", tmp_path)
    assert readme.README.read_text() == before
