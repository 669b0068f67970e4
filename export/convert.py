"""Fuse a training checkpoint into a plain one, streaming tensor by tensor.

Reads a file (or a sharded directory) written by ``mdparam.save_training``,
fuses each parametrized tensor with the library's own formula
(:func:`mdparam.fuse`) and writes a plain safetensors checkpoint with the
same header as ``mdparam.save_plain``. Peak memory is about one tensor:
each is read with plain file reads, fused in place, written, and dropped.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from mdparam.checkpoint_format import (
    FusedSpec,
    fuse_spec,
    parse_training_metadata,
    plain_metadata,
    plain_plan,
)
from mdparam.safetensors_io import (
    CheckpointReader,
    SafetensorsFormatError,
    atomic_path,
    write_file,
    write_sharded,
)

__all__ = ["DTYPES", "convert", "main"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    existing ``dst`` is refused unless ``overwrite``.
    """
    src, dst = Path(src), Path(dst)
    sharded = src.is_dir()
    if not sharded:
        atomic_path(dst, overwrite=overwrite)
    elif not dst.parent.is_dir():
        raise FileNotFoundError(
            f"the directory of {dst} does not exist; create it first (nothing was written)"
        )
    elif dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --force (overwrite=True) to replace it")
    with CheckpointReader(src) as reader:
        specs = parse_training_metadata(reader.metadata, str(src))
        plan = plain_plan(list(reader.entries), specs)
        source = dict(plan)

        def out_spec(name: str) -> tuple[str, torch.dtype, tuple[int, ...]]:
            src_ = source[name]
            key = src_.originals[0] if isinstance(src_, FusedSpec) else src_
            entry = reader.entries[key]
            shape = src_.config.shape if isinstance(src_, FusedSpec) else entry.shape
            cast = dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype
            return name, cast, tuple(shape)

        total = sum(e.nbytes for e in reader.entries.values())
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=not progress)

        # Two reusable buffers: the writer holds at most one tensor while the
        # next is produced (see write_file), so they alternate safely.
        largest = max((e.nbytes for e in reader.entries.values()), default=0)
        buffers = [torch.empty(largest, dtype=torch.uint8) for _ in range(2)]
        turn = iter(range(1 << 62))

        @torch.no_grad()
        def produce(name: str) -> torch.Tensor:
            buf = buffers[next(turn) % 2]
            src_ = source[name]
            if isinstance(src_, FusedSpec):
                first = src_.originals[0]
                get = lambda k: reader.get(k, out=buf if k == first else None)  # noqa: E731
                t = fuse_spec(src_, get, inplace=True)
                bar.update(sum(reader.entries[k].nbytes for k in src_.originals))
            else:
                t = reader.get(src_, out=buf)
                bar.update(reader.entries[src_].nbytes)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        fused = [name for name, s in plan if isinstance(s, FusedSpec)]
        meta = plain_metadata(fused)
        try:
            if not sharded:
                write_file(dst, [out_spec(n) for n, _ in plan], produce, meta, overwrite=overwrite)
            else:
                shard_of = {}
                for name, s in plan:
                    key = s.originals[0] if isinstance(s, FusedSpec) else s
                    shard_of[name] = reader.files[key]
                order = list(dict.fromkeys(shard_of.values()))
                shards = [[out_spec(n) for n, _ in plan if shard_of[n] == f] for f in order]
                write_sharded(dst, shards, produce, meta, overwrite=overwrite)
        finally:
            bar.close()
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Fuse an mdparam training checkpoint (file or sharded directory) into a plain "
        "safetensors checkpoint that loads into the original model without mdparam.",
    )
    p.add_argument(
        "src",
        help="training checkpoint: .safetensors file or directory with model.safetensors.index.json",
    )
    p.add_argument("dst", help="plain checkpoint to write (a directory if src is one)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: keep)")
    p.add_argument("--force", action="store_true", help="replace dst if it exists")
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
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"export: wrote {out}", file=sys.stderr)
    return 0
