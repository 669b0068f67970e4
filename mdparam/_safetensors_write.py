"""Writing safetensors files one tensor at a time, atomically (hand-written).

The safetensors format is an 8-byte little-endian header length, a JSON header
(``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets"}}``)
and the raw tensor bytes. The safetensors library writes only a state dict held
whole in memory; writing the format here lets a converter stream: the header
is known before any tensor is computed, so each tensor is written as soon as it
exists and then dropped.

Every kind of file written here (single, sharded, each dtype in
``DTYPE_NAMES``) loads with ``safetensors.torch.load_file``
(tests/test_export.py). Reading goes through the library:
``mdparam._safetensors_read``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so no temporary is ever judged stale
    fcntl = None

import torch
from torch import Tensor

INDEX_NAME = "model.safetensors.index.json"

__all__ = [
    "DTYPE_NAMES",
    "INDEX_NAME",
    "atomic_path",
    "pack_shards",
    "remove_stale_temporaries",
    "write_file",
    "write_sharded",
]

# The dtypes written here, under their names in the format; the reader reads the same.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPE_NAMES[getattr(torch, _attr)] = _name
_CHUNK = 1 << 20
STALE_AFTER = 10.0  # seconds; see remove_stale_temporaries


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_path(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Check a destination (file or checkpoint directory) before anything is written."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"the directory of {path} does not exist; create it first (nothing was written)"
        )
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists; pass overwrite=True (--force on the command line) to replace it"
        )
    return path


def _temporary_name(target: str) -> re.Pattern[str]:
    """The names ``tempfile.mkstemp``/``mkdtemp`` give a temporary of ``target`` here.

    ``.{target}.`` + 8 random characters + ``.tmp``; the random part has no
    dot, so a name matches the temporaries of one target only.
    """
    return re.compile(re.escape(f".{target}.") + r"[a-z0-9_]{8}\.tmp")


@contextlib.contextmanager
def _held(tmp: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on a temporary (file or directory) while it is written.

    The lock lives on its own open file, so it lasts until this block ends,
    across the rename, whatever happens to the writer's handle; the kernel
    drops it when the process dies, SIGKILL included. Where locks are not
    available (no ``fcntl``, or a file system without ``flock``) the write
    goes ahead unlocked: such a file system fails the cleaner's lock too, so
    nothing there is ever judged stale.
    """
    fd = None
    try:
        if fcntl is not None:
            fd = os.open(tmp, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _remove_if_stale(tmp: Path, min_age: float) -> bool:
    """Delete ``tmp`` if no writer holds its lock and it is ``min_age`` seconds old."""
    try:  # O_NOFOLLOW: a symlink is nobody's temporary; O_NONBLOCK: a FIFO does not hang
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a live writer holds it
        st = os.fstat(fd)
        if time.time() - st.st_mtime < min_age:
            return False
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(tmp)
        elif stat.S_ISREG(st.st_mode):
            tmp.unlink()
        else:
            return False
        return True
    except OSError:  # locked, vanished, not ours to delete: leave it
        return False
    finally:
        os.close(fd)


def remove_stale_temporaries(
    path: str | os.PathLike, *, min_age: float = STALE_AFTER
) -> list[Path]:
    """Delete the temporaries that killed writers of ``path`` left beside it; return them.

    ``write_file`` and ``write_sharded`` write ``path`` through a
    hidden temporary ``.NAME.XXXXXXXX.tmp`` (a file, or a directory for a
    sharded checkpoint) in the same directory, renamed into place when
    complete. A writer killed with SIGKILL (or by a power cut) cannot delete
    it; the next write to ``path`` calls this function first.

    Only names of that exact pattern for this ``path`` are considered, and one
    is removed only when both hold:

    - no process holds its lock: every writer here takes an exclusive
      ``flock`` on its temporary right after creating it and keeps it until
      the rename; the kernel releases it when the writer dies, so a live
      writer's temporary, however slow, is never touched;
    - it was last modified ``min_age`` seconds ago or more (default
      ``STALE_AFTER``, 10 s): this covers the instant between a writer
      creating its temporary and locking it.

    So a temporary left by a writer killed less than ``min_age`` seconds ago
    stays until a later write. Symlinks and other file kinds are never
    removed; errors (permissions, a name that vanished) leave the entry as it
    is. Without ``fcntl`` (not POSIX) nothing is removed. Two processes
    writing the same path at once is not supported, but neither deletes the
    other's temporary, and the last rename wins with a complete file.

    >>> import os, tempfile, time
    >>> from pathlib import Path
    >>> work = Path(tempfile.mkdtemp())
    >>> left = work / ".model.safetensors.k2j4h5g6.tmp"  # what a killed save leaves
    >>> _ = left.write_bytes(b"half a checkpoint")
    >>> os.utime(left, (time.time() - 60,) * 2)  # a minute ago
    >>> [p.name for p in remove_stale_temporaries(work / "model.safetensors")]
    ['.model.safetensors.k2j4h5g6.tmp']
    >>> sorted(os.listdir(work))
    []
    >>> work.rmdir()
    """
    if fcntl is None:
        return []
    path = Path(path)
    pattern = _temporary_name(path.name)
    try:
        names = [e.name for e in os.scandir(path.parent) if pattern.fullmatch(e.name)]
    except OSError:
        return []
    return [path.parent / n for n in sorted(names) if _remove_if_stale(path.parent / n, min_age)]


def _write_tensors(f, specs, produce: Callable[[str], Tensor]) -> None:
    """Write each produced tensor; the next one is produced while this one is written.

    A second thread does the writes (file writes and torch ops both release the
    GIL). Two slots bound memory to two tensors in flight.
    """
    slots = threading.Semaphore(2)
    jobs: queue.Queue = queue.Queue()
    failed: list[BaseException] = []

    def writer() -> None:
        while (t := jobs.get()) is not None:
            try:
                if t.numel() and not failed:
                    view = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # 0-d too
                    for i in range(0, len(view), _CHUNK):  # small writes copy from cache
                        f.write(view[i : i + _CHUNK])
            except BaseException as e:
                failed.append(e)
            t = None
            slots.release()

    thread = threading.Thread(target=writer, name="safetensors-writer", daemon=True)
    thread.start()
    try:
        for name, dtype, shape in specs:
            slots.acquire()
            if failed:
                break
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise RuntimeError(
                    f"tensor {name!r} came out as {t.dtype} {tuple(t.shape)}, "
                    f"announced as {dtype} {tuple(shape)}"
                )
            jobs.put(t.detach().to("cpu").contiguous())
            del t
    finally:
        jobs.put(None)
        thread.join()
    if failed:
        raise failed[0]


def write_file(
    path: str | os.PathLike,
    specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Write a safetensors file whose tensors are computed one at a time.

    ``specs`` gives name, dtype and shape of every tensor in file order;
    ``produce(name)`` is called once per tensor, in that order, and its result
    is written and released. The file appears at ``path`` only when complete
    (written to a temporary file in the same directory, flushed, then renamed):
    an error or a kill midway leaves any previous file at ``path`` untouched.
    Before writing, the temporaries that killed writers of ``path`` left are
    deleted (see ``remove_stale_temporaries`` for which ones).
    """
    path = atomic_path(path, overwrite=overwrite)
    specs = list(specs)
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; bad keys: {bad}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in specs:
        if dtype not in DTYPE_NAMES:
            raise TypeError(
                f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors; cast it "
                "(dtype=torch.float32 or torch.bfloat16) before saving"
            )
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = numel * dtype.itemsize
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": [int(s) for s in shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f, _held(tmp):
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            _write_tensors(f, specs, produce)
            f.flush()
            os.fsync(f.fileno())
            f.close()  # closed before the rename; the lock is held until after it
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pack_shards(
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Split ``specs`` in order into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        numel = 1
        for s in spec[2]:
            numel *= int(s)
        nbytes = numel * spec[1].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_sharded(
    dirpath: str | os.PathLike,
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]],
    produce: Callable[[str], Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a sharded checkpoint directory (``model.safetensors.index.json`` + shards).

    The directory appears only when every shard is complete: it is built
    beside ``dirpath`` under a temporary name (locked while it is written),
    then renamed into place. Stale temporary directories that killed writers
    of ``dirpath`` left are deleted first (see ``remove_stale_temporaries``).
    """
    dirpath = atomic_path(dirpath, overwrite=overwrite)
    remove_stale_temporaries(dirpath)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dirpath.name}.", suffix=".tmp", dir=dirpath.parent))
    old = None
    try:
        with _held(tmp):
            os.chmod(tmp, 0o777 & ~_umask())
            n = len(shards)
            weight_map: dict[str, str] = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                write_file(tmp / fname, shard, produce, metadata)
                weight_map.update(dict.fromkeys((name for name, *_ in shard), fname))
            index = {"metadata": dict(metadata or {}), "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
            if dirpath.exists():
                old = dirpath.with_name(f".{dirpath.name}.old-{os.getpid()}")
                os.replace(dirpath, old)
            os.replace(tmp, dirpath)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not dirpath.exists():
            os.replace(old, dirpath)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    return dirpath
