"""A byte-level text corpus built from the Python standard library on this machine.

No download: every machine with Python has these files. The file list is
sorted and filtered the same way everywhere, so machines with the same Python
version build the same corpus (its SHA-256 is recorded with every run).
Validation takes every 20th file, so no file is in both splits.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass
class Corpus:
    train: Tensor  # uint8
    val: Tensor  # uint8
    sha256: str
    files: int
    source: str

    def batch(
        self, split: str, batch: int, block: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        data = self.train if split == "train" else self.val
        ix = torch.randint(len(data) - block - 1, (batch,), generator=generator)
        chunk = torch.stack([data[i : i + block + 1] for i in ix.tolist()]).long()
        return chunk[:, :-1], chunk[:, 1:]


def stdlib_files(root: Path | None = None) -> list[Path]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not (_SKIP_DIRS & set(p.relative_to(root).parts[:-1])) and p.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(text_file: str | None = None, max_bytes: int | None = None) -> Corpus:
    """The standard-library corpus, or a user's text file (split 95/5 by position)."""
    if text_file is not None:
        raw = Path(text_file).read_bytes()
        if len(raw) < 10_000:
            raise ValueError(f"{text_file} has {len(raw)} bytes; give at least 10 kB of text")
        cut = int(len(raw) * 0.95)
        train, val, n, source = raw[:cut], raw[cut:], 1, str(text_file)
    else:
        files = stdlib_files()
        parts: list[list[bytes]] = [[], []]
        for i, p in enumerate(files):
            parts[i % 20 == 0].append(p.read_bytes() + b"\n\n")
        train, val = b"".join(parts[0]), b"".join(parts[1])
        n, source = len(files), f"python{sysconfig.get_python_version()} stdlib"
    if max_bytes is not None:
        train, val = train[:max_bytes], val[: max(max_bytes // 20, 100_000)]
    digest = hashlib.sha256(train + b"\0" + val).hexdigest()
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return Corpus(as_tensor(train), as_tensor(val), digest, n, source)
