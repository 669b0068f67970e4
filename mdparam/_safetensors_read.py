"""Reading safetensors checkpoints (a file, or a sharded directory) through the library.

The format is ``safetensors.safe_open``'s business: it checks each header (its
length, the JSON, every tensor's dtype, shape and offsets, data that the
tensors cover exactly) and reads tensors. mdparam adds what a checkpoint needs
around it: sharded directories (their index), errors that name the file and
say what to do (``SafetensorsFormatError``, the library's message
inside), and reads that keep resident memory near one tensor.

Reads are per tensor through ``safe_open``, each file opened once (so a
checkpoint replaced on disk during a read is still read whole from the version
that was opened). Files are opened with the library's ``pread`` backend
(safetensors >= 0.8, hence the dependency's floor): each read copies one
tensor into memory of its own and nothing else of the file stays resident. The
default ``mmap`` backend returns views of a map whose pages stay resident until
the file is closed, so resident memory would grow by the file's pages read so
far (a converter run peaked at 1316 MiB on a 1.01 GB checkpoint with safetensors 0.4.5).

Writing is hand-written, to stream: ``mdparam._safetensors_write``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ._safetensors_write import DTYPE_NAMES, INDEX_NAME

__all__ = ["CheckpointReader", "SafetensorsFormatError", "TensorEntry", "read_header"]

_DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class SafetensorsFormatError(ValueError):
    """The file is not a safetensors file mdparam can read (incomplete, corrupt, or of another dtype)."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, as its header describes it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _corrupt(path: Path, why: str) -> SafetensorsFormatError:
    return SafetensorsFormatError(
        f"{path} is not a complete safetensors file ({why}); it may be truncated or corrupt: "
        "re-create it from its source"
    )


def _reason(error: Exception) -> str:
    """The library's complaint about a file, with a header that is not JSON said so first."""
    text = str(error).removeprefix("Error while deserializing header: ")
    # safetensors says "invalid JSON in header" / "invalid UTF-8 in header"
    squashed = text.lower().replace(" ", "")
    if any(s in squashed for s in ("json", "utf-8")):
        return f"header is not JSON that safetensors accepts: {text}"
    return text


@contextlib.contextmanager
def _library_errors(path: Path) -> Iterator[None]:
    """Re-raise the library's errors about ``path`` as ``SafetensorsFormatError``."""
    try:
        yield
    except SafetensorError as e:
        raise _corrupt(path, _reason(e)) from e


def _open(path: Path) -> safe_open:
    """``safe_open`` on ``path`` (pread backend); the header is checked here."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a safetensors file")
    with _library_errors(path):
        return safe_open(str(path), framework="pt", backend="pread")


def _header(handle: safe_open, path: Path) -> tuple[dict[str, str], dict[str, TensorEntry]]:
    """The metadata and the entries (in file order where the library gives it) of an open file."""
    with _library_errors(path):
        metadata = handle.metadata() or {}
        names = handle.offset_keys()  # in file order
        entries = {}
        for name in names:
            info = handle.get_slice(name)
            code = info.get_dtype()
            if code not in _DTYPES:
                raise SafetensorsFormatError(
                    f"{path}: tensor {name!r} is stored as {code}, a dtype mdparam does not read "
                    f"({', '.join(_DTYPES)}); cast it to one of those and save it again"
                )
            entries[name] = TensorEntry(name, _DTYPES[code], tuple(info.get_shape()))
    return dict(metadata), entries


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, TensorEntry]]:
    """The metadata and the tensor entries of a safetensors file, checked by the library.

    Raises ``FileNotFoundError`` / ``IsADirectoryError`` for a path that is not
    a file and ``SafetensorsFormatError`` for a file that is not a
    complete safetensors file, or holds a dtype mdparam does not read.
    """
    path = Path(path)
    with _open(path) as handle:
        return _header(handle, path)


class CheckpointReader:
    """Tensors of a safetensors file or a sharded directory, read one at a time.

    Every header is read and checked when the reader is made: ``metadata``
    (the file's; for a directory the index's, else its first shard's),
    ``entries`` (name -> ``TensorEntry``) and ``files`` (name -> the file
    that holds it). ``get`` reads one tensor. Close it (or use ``with``)
    to close the files.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self.entries: dict[str, TensorEntry] = {}
        self.files: dict[str, Path] = {}
        self._handles: dict[Path, safe_open] = {}
        self._closing = contextlib.ExitStack()
        try:
            if self.path.is_dir():
                self._add_sharded()
            else:
                self.metadata = self._add(self.path)
        except BaseException:
            self.close()
            raise

    def _add(self, file: Path) -> dict[str, str]:
        """Add ``file``'s entries, keeping it open for ``get``; return its metadata."""
        handle = self._closing.enter_context(_open(file))
        metadata, entries = _header(handle, file)
        self._handles[file] = handle
        self.entries.update(entries)
        self.files.update(dict.fromkeys(entries, file))
        return metadata

    def _add_sharded(self) -> None:
        index = self.path / INDEX_NAME
        if not index.exists():
            raise FileNotFoundError(
                f"{self.path} is a directory without {INDEX_NAME}; give a .safetensors file or a "
                "sharded checkpoint directory"
            )
        try:
            info = json.loads(index.read_text())
            weight_map = info["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{index} is not a valid index ({e}); re-create the checkpoint"
            ) from None
        self.metadata = dict(info.get("metadata") or {})
        for shard in dict.fromkeys(weight_map.values()):
            metadata = self._add(self.path / shard)
            if not self.metadata:
                self.metadata = metadata
        missing = [k for k in weight_map if k not in self.entries]
        if missing:
            raise ValueError(f"{index} lists {missing[0]!r} but its shard does not hold it")

    def get(self, name: str) -> Tensor:
        """Tensor ``name``, read into memory of its own: the caller may change it in place."""
        file = self.files[name]
        with _library_errors(file):
            return self._handles[file].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()
        self._closing.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
