"""Put a benchmark's Markdown table into the documentation, between its markers.

Each benchmark command ends by calling ``insert``, so the tables in the
README and the pages under docs/ are always the ones its last run wrote
(``<!-- begin:NAME -->`` ... ``<!-- end:NAME -->``, in whichever page holds them).
"""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
RESULTS = README.parent / "benchmarks" / "results"
DOCS = README.parent / "docs"


def pages() -> list[Path]:
    """The README and every documentation page (not the results that docs/ links to)."""
    return [README, *sorted(p for p in DOCS.rglob("*.md") if "results" not in p.parts)]


def insert(name: str, text: str, readme: Path | None = None) -> bool:
    """Replace the block between the markers of ``name`` in the page that has them (``readme``
    alone if given); False if none has."""
    begin, end = f"<!-- begin:{name} -->", f"<!-- end:{name} -->"
    for page in [readme] if readme is not None else pages():
        content = page.read_text()
        if begin not in content or end not in content:
            continue
        head, rest = content.split(begin, 1)
        _, tail = rest.split(end, 1)
        page.write_text(f"{head}{begin}\n{text.strip()}\n{end}{tail}")
        return True
    return False


def insert_if_committed(name: str, text: str, out_dir: str | Path) -> bool:
    """``insert``, only for a run that wrote the committed results (benchmarks/results).

    A run with ``--out`` elsewhere is a trial and leaves the README alone.
    """
    if Path(out_dir).resolve() != RESULTS.resolve():
        return False
    return insert(name, text)
