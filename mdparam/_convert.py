"""Fuse a training checkpoint into a plain one, streaming tensor by tensor.

    mdparam-export IN OUT [--dtype bfloat16] [--force] [--quiet]
    python -m export IN OUT ...            (the same, from a checkout of the repository)

Reads a file (or a sharded directory) written by ``mdparam.save_training``,
fuses each parametrized tensor with the library's own formula
(``mdparam.fuse``) and writes a plain safetensors checkpoint with the
same header as ``mdparam.save_plain``. The model's class is never imported
or built: the header says how each tensor is parametrized. Peak memory is
about one tensor (with safetensors >= 0.8): each is read on its own through
``safetensors.safe_open`` (see ``mdparam._safetensors_read``), fused in
place, written, and dropped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from ._checkpoint_format import (
    FusedSpec,
    fuse_spec,
    parse_training_metadata,
    plain_metadata,
    plain_plan,
)
from ._safetensors_read import CheckpointReader, SafetensorsFormatError
from ._safetensors_write import INDEX_NAME, atomic_path, write_file, write_sharded

__all__ = ["DTYPES", "convert", "main", "refuse_input_as_output"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Spec = tuple[str, torch.dtype, tuple[int, ...]]


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: torch.dtype | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write the plain checkpoint of training checkpoint ``src`` to ``dst``.

    A single file gives a single file; a sharded directory gives a directory
    with the same shards (each fused tensor goes where its direction was).
    ``dtype`` casts floating tensors. ``dst`` appears only when complete and an
    existing ``dst`` is refused unless ``overwrite``. A ``dst`` that is the
    input itself (or contains it) is always refused, see
    ``refuse_input_as_output``. Returns ``dst``.

    >>> import shutil, tempfile, torch, safetensors.torch, mdparam
    >>> from pathlib import Path
    >>> from mdparam._convert import convert
    >>> work = Path(tempfile.mkdtemp())
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> _ = mdparam.register(model)
    >>> train = mdparam.save_training(model, work / "train.safetensors")
    >>> out = convert(train, work / "model.safetensors")
    >>> plain = torch.nn.Sequential(torch.nn.Linear(8, 4))  # never registered
    >>> plain.load_state_dict(safetensors.torch.load_file(out), strict=True)
    <All keys matched successfully>
    >>> x = torch.randn(2, 8)
    >>> torch.equal(plain(x), model(x))
    True
    >>> shutil.rmtree(work)
    """
    src, dst = Path(src), Path(dst)
    with CheckpointReader(src) as reader:
        refuse_input_as_output(_input_files(reader), dst)
        atomic_path(dst, overwrite=overwrite)
        plan = plain_plan(list(reader.entries), parse_training_metadata(reader.metadata, str(src)))
        specs = {name: _out_spec(reader, source, dtype) for name, source in plan}
        meta = plain_metadata([name for name, s in plan if isinstance(s, FusedSpec)])
        total = sum(e.nbytes for e in reader.entries.values())
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=not progress)
        produce = _producer(reader, dict(plan), dtype, bar.update)
        try:
            if src.is_dir():
                shards = _shards(reader, plan, specs)
                write_sharded(dst, shards, produce, meta, overwrite=overwrite)
            else:
                write_file(dst, list(specs.values()), produce, meta, overwrite=overwrite)
        finally:
            bar.close()
    return dst


def refuse_input_as_output(inputs: list[Path], dst: str | os.PathLike) -> None:
    """Raise ``shutil.SameFileError`` if writing ``dst`` would replace one of ``inputs``.

    ``inputs`` are the files a conversion reads, the checkpoint itself first
    (for a sharded directory: the directory, its index and its shards). ``dst``
    is refused when it is one of them, under any name (a symlink, a hard link,
    ``./x`` for ``x``: compared by device and inode, as ``os.path.samefile``
    does), or a directory that holds one of them: replacing it would destroy
    the training checkpoint, so ``--force`` does not lift this. A ``dst`` that
    does not exist yet is never an input.

    >>> import shutil, tempfile
    >>> from pathlib import Path
    >>> work = Path(tempfile.mkdtemp())
    >>> ckpt = work / "train.safetensors"
    >>> _ = ckpt.write_bytes(b"weights")
    >>> refuse_input_as_output([ckpt], work / "model.safetensors")  # a new path: fine
    >>> refuse_input_as_output([ckpt], work / "." / "train.safetensors")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    shutil.SameFileError: ...
    >>> shutil.rmtree(work)
    """
    dst, ckpt = Path(dst), inputs[0]
    try:
        target = dst.stat()
    except OSError:  # absent (or unreadable: the write itself reports that)
        return
    fix = ". Write the output to another path (nothing was written; --force does not change this)"
    for f in inputs:
        if os.path.samestat(target, f.stat()):
            alias = os.path.abspath(f) != os.path.abspath(dst)  # else the same path, spelled alike
            if f == ckpt:
                what = f"{'the same file as ' if alias else ''}the input checkpoint {ckpt}"
            else:
                what = f"{f'the same file as {f}, ' if alias else ''}a file of the input checkpoint {ckpt}"
            raise shutil.SameFileError(
                f"the output {dst} is {what}: converting onto it would replace the training "
                f"checkpoint with its plain conversion{fix}"
            )
    for f in inputs:
        if any(os.path.samestat(target, parent.stat()) for parent in f.resolve().parents):
            raise shutil.SameFileError(
                f"the output {dst} is a directory that holds the input checkpoint {ckpt}: "
                f"replacing it would delete the training checkpoint{fix}"
            )


def _input_files(reader: CheckpointReader) -> list[Path]:
    """Every path the conversion reads: the checkpoint, then its index and shards."""
    files = [reader.path]
    if reader.path.is_dir():
        files.append(reader.path / INDEX_NAME)
    files.extend(dict.fromkeys(reader.files.values()))
    return files


def _out_spec(reader: CheckpointReader, source: FusedSpec | str, dtype: torch.dtype | None) -> Spec:
    """Name, dtype and shape of one output tensor (its header entry, before it exists)."""
    if isinstance(source, FusedSpec):
        entry = reader.entries[source.originals[0]]
        name, shape = source.name, source.config.shape
    else:
        entry = reader.entries[source]
        name, shape = source, entry.shape
    cast = dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype
    return name, cast, tuple(shape)


def _producer(
    reader: CheckpointReader,
    source: dict[str, FusedSpec | str],
    dtype: torch.dtype | None,
    advance: Callable[[int], object],
) -> Callable[[str], torch.Tensor]:
    """``produce(name)`` for the writer: each output tensor, read and fused in place.

    Every read is a tensor of its own (see ``CheckpointReader.get``), so the
    direction read for a fused tensor becomes that tensor; it is dropped once
    written (``write_file`` holds at most one while the next is produced).
    """

    @torch.no_grad()
    def produce(name: str) -> torch.Tensor:
        src = source[name]
        if isinstance(src, FusedSpec):
            t = fuse_spec(src, reader.get, inplace=True)
            advance(sum(reader.entries[k].nbytes for k in src.originals))
        else:
            t = reader.get(src)
            advance(reader.entries[src].nbytes)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    return produce


def _shards(
    reader: CheckpointReader, plan: list[tuple[str, FusedSpec | str]], specs: dict[str, Spec]
) -> list[list[Spec]]:
    """The output's shards: each tensor goes to the shard its direction (or itself) was in."""
    shard_of = {}
    for name, s in plan:
        shard_of[name] = reader.files[s.originals[0] if isinstance(s, FusedSpec) else s]
    order = list(dict.fromkeys(shard_of.values()))
    return [[specs[n] for n, _ in plan if shard_of[n] == f] for f in order]


def main(argv: list[str] | None = None, prog: str = "mdparam-export") -> int:
    """The command line: ``mdparam-export IN OUT [--dtype D] [--force] [--quiet]``.

    Returns the exit status: 0, or 1 with the error on stderr (no traceback).
    ``prog`` names the command in messages.

    >>> import tempfile
    >>> from pathlib import Path
    >>> missing = Path(tempfile.mkdtemp()) / "missing.safetensors"
    >>> main([str(missing), str(missing.with_name("out.safetensors")), "--quiet"])
    1
    >>> missing.parent.rmdir()
    """
    p = argparse.ArgumentParser(
        prog=prog,
        description="Fuse an mdparam training checkpoint (file or sharded directory) into a plain "
        "safetensors checkpoint that loads into the original model without mdparam.",
    )
    p.add_argument(
        "src",
        help="training checkpoint: .safetensors file or directory with model.safetensors.index.json",
    )
    p.add_argument(
        "dst", help="plain checkpoint to write (a directory if src is one); never src itself"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: keep)")
    p.add_argument("--force", action="store_true", help="replace dst if it exists (not src)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        out = convert(
            args.src,
            args.dst,
            DTYPES.get(args.dtype),
            overwrite=args.force,
            progress=not args.quiet,
        )
    except (OSError, ValueError, SafetensorsFormatError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"{prog}: wrote {out}", file=sys.stderr)
    return 0
