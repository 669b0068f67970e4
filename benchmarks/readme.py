"""Put a benchmark's Markdown table into README.md, between its markers.

Each benchmark command ends by calling :func:`insert`, so the tables in the
README are always the ones its last run wrote (``<!-- begin:NAME -->`` ...
``<!-- end:NAME -->``).
"""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
RESULTS = README.parent / "benchmarks" / "results"


def insert(name: str, text: str, readme: Path | None = None) -> bool:
    """Replace the block between the markers of ``name``; False if the README has none."""
    readme = README if readme is None else readme
    begin, end = f"<!-- begin:{name} -->", f"<!-- end:{name} -->"
    content = readme.read_text()
    if begin not in content or end not in content:
        return False
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{text.strip()}\n{end}{tail}")
    return True


def insert_if_committed(name: str, text: str, out_dir: str | Path) -> bool:
    """:func:`insert`, only for a run that wrote the committed results (benchmarks/results).

    A run with ``--out`` elsewhere is a trial and leaves the README alone.
    """
    if Path(out_dir).resolve() != RESULTS.resolve():
        return False
    return insert(name, text)
