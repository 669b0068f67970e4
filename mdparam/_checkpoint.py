"""Checkpoints of a registered model: plain (fused) exports and training states.

- ``plain_state_dict`` / ``save_plain``: fused weights under the names
  the original architecture has; loads with ``strict=True`` into a model that
  never saw mdparam.
- ``load_plain``: a plain checkpoint (say, pretrained weights) into a
  registered model, which then computes what the plain weights compute.
- ``save_training`` / ``load_training``: the registered model's own
  state (directions, raw gains, the rest), with each parametrized tensor's
  configuration in the header, so ``mdparam-export`` can fuse the file
  without the model.

Fused weights are built from the state dict (never by removing
parametrizations), one tensor at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ._checkpoint_format import (
    FusedSpec,
    check_kind,
    fuse_spec,
    parse_training_metadata,
    plain_metadata,
    plain_plan,
    training_metadata,
)
from ._distributed import any_rank, is_sharded
from ._fused_weights import refresh_kept
from ._safetensors_read import CheckpointReader
from ._safetensors_write import atomic_path, pack_shards, write_file, write_sharded
from ._tree import clean_key, full_tensor, original_name, originals, registered, unwrap

__all__ = [
    "load_plain",
    "load_training",
    "plain_state_dict",
    "save_plain",
    "save_training",
]


@dataclass
class _State:
    """A registered model's state under clean names, read lazily."""

    keys: list[str]
    tensors: dict[str, Tensor]  # clean key -> live tensor (Parameter or buffer)
    specs: dict[str, FusedSpec]
    entries: dict[str, list]  # plain name -> Registered entries holding it

    reads: int = 0  # calls of get(): how far a writer got through its gathers

    def get(self, key: str) -> Tensor:
        self.reads += 1
        return full_tensor(self.tensors[key].detach())


def _state(model: nn.Module, what: str, loading: bool = False) -> _State:
    inner = unwrap(model)
    entries = registered(inner)
    if not entries:
        raise ValueError(
            f"mdparam.{what}: the model has no MD-parametrized tensor. Call "
            "mdparam.register(model) first (for a plain model use load_state_dict or "
            "safetensors.torch.save_model directly)"
        )
    live = inner.state_dict(keep_vars=True)
    tensors = {clean_key(k): v for k, v in live.items()}
    specs: dict[str, FusedSpec] = {}
    by_name: dict[str, list] = {}
    for e in entries:
        prefix = e.name[: -len(e.tensor_name)]
        base = f"{prefix}parametrizations.{e.tensor_name}."
        keys = tuple(clean_key(base + original_name(i)) for i in range(len(e.config.roles)))
        radius = clean_key(f"{base}0.radius") if e.parametrization.radius is not None else None
        name = clean_key(e.name)
        specs[name] = FusedSpec(name, e.config, keys, radius)
        by_name.setdefault(name, []).append(e)
    if loading and any(is_sharded(t) for t in tensors.values()):
        raise RuntimeError(
            f"mdparam.{what}: the model is sharded by FSDP2. Load before sharding "
            "(register -> load -> fully_shard), or resume a sharded run with "
            "torch.distributed.checkpoint (docs/guides/distributed.md says how)"
        )
    return _State(list(tensors), tensors, specs, by_name)


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _plain_specs(st: _State, dtype: torch.dtype | None):
    plan = plain_plan(st.keys, st.specs)
    specs = []
    for name, src in plan:
        if isinstance(src, FusedSpec):
            d = st.tensors[src.originals[0]]
            t_dtype = dtype if dtype is not None else d.dtype
            specs.append((name, t_dtype, src.config.shape))
        else:
            t = st.tensors[src]
            specs.append(
                (
                    name,
                    t.dtype if dtype is None or not t.is_floating_point() else dtype,
                    tuple(t.shape),
                )
            )
    return plan, specs


def _producer(st: _State, plan, dtype: torch.dtype | None) -> Callable[[str], Tensor]:
    source = dict(plan)

    @torch.no_grad()
    def produce(name: str) -> Tensor:
        src = source[name]
        t = fuse_spec(src, st.get) if isinstance(src, FusedSpec) else st.get(src)
        return _cast(t, dtype)

    return produce


def _read_order(plan, specs) -> list[str]:
    """Every state key the writer of ``specs`` reads, in its order (a fused tensor reads
    its originals in order: see ``fuse_spec``); other ranks gather the same keys."""
    source = dict(plan)
    order: list[str] = []
    for name, *_ in specs:
        src = source[name]
        order.extend(src.originals if isinstance(src, FusedSpec) else (src,))
    return order


def plain_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Fused weights under plain names, as a model that never saw mdparam has them.

    The model is not changed (this works mid-training). Compiled (``_orig_mod``)
    and DDP (``module.``) wrappers are seen through. Tensors that are not
    fused are the model's own (detached), as in ``state_dict()``.

    Examples:
        >>> import torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = mdparam.register(model)
        >>> sorted(mdparam.plain_state_dict(model))
        ['0.bias', '0.weight']
        >>> fresh = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> fresh.load_state_dict(mdparam.plain_state_dict(model), strict=True)
        <All keys matched successfully>
    """
    st = _state(model, "plain_state_dict")
    plan, _ = _plain_specs(st, dtype)
    produce = _producer(st, plan, dtype)
    return {name: produce(name) for name, _ in plan}


def save_plain(
    model: nn.Module,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``plain_state_dict`` to a safetensors file, atomically.

    ``dtype`` casts floating tensors (e.g. ``torch.bfloat16``); ``metadata``
    adds str -> str entries to the header, beside mdparam's own (format,
    versions, the list of fused tensors). Tied weights are written under
    every name, so the file loads into a fresh plain model with one line,
    and the tie survives::

        model.load_state_dict(safetensors.torch.load_file(path), strict=True)

    The file appears only when complete; a crash leaves any previous file at
    ``path`` as it was. An existing ``path`` is refused unless ``overwrite``.
    Under FSDP2 call it on every rank: all gather the full tensors, rank 0
    writes.

    Examples:
        >>> import os, tempfile, torch, mdparam, safetensors.torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = mdparam.register(model)
        >>> path = mdparam.save_plain(model, os.path.join(tempfile.mkdtemp(), "p.safetensors"))
        >>> plain = torch.nn.Sequential(torch.nn.Linear(4, 4))  # no mdparam needed from here
        >>> plain.load_state_dict(safetensors.torch.load_file(path), strict=True)
        <All keys matched successfully>
    """
    path = atomic_path(path, overwrite=overwrite)
    st = _state(model, "save_plain")
    plan, specs = _plain_specs(st, dtype)
    fused = [name for name, src in plan if isinstance(src, FusedSpec)]
    produce = _producer(st, plan, dtype)
    meta = plain_metadata(fused, metadata)
    _on_writer_rank(
        st,
        _read_order(plan, specs),
        lambda: write_file(path, specs, produce, meta, overwrite=overwrite),
    )
    return path


def save_training(
    model: nn.Module,
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write the registered model's own state, with each tensor's MD configuration.

    ``mdparam-export IN OUT`` turns the file into a plain checkpoint without the
    model; ``load_training`` resumes from it exactly. With
    ``max_shard_bytes``, ``path`` is a directory of shards with a
    ``model.safetensors.index.json``. The optimizer's state is not included:
    save ``optimizer.state_dict()`` beside it.

    Examples:
        >>> import os, tempfile, torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = mdparam.register(model)
        >>> path = mdparam.save_training(model, os.path.join(tempfile.mkdtemp(), "t.safetensors"))
        >>> path.name
        't.safetensors'
    """
    st = _state(model, "save_training")
    meta = training_metadata(st.specs.values(), metadata)
    specs = [(k, st.tensors[k].dtype, tuple(st.tensors[k].shape)) for k in st.keys]
    if max_shard_bytes is None:
        path = atomic_path(path, overwrite=overwrite)
        _on_writer_rank(
            st,
            [name for name, *_ in specs],
            lambda: write_file(path, specs, st.get, meta, overwrite=overwrite),
        )
    else:
        path = Path(path)
        shards = pack_shards(specs, max_shard_bytes)
        _on_writer_rank(
            st,
            [name for shard in shards for name, *_ in shard],
            lambda: write_sharded(path, shards, st.get, meta, overwrite=overwrite),
        )
    return path


def _on_writer_rank(st: _State, order: list[str], write: Callable[[], object]) -> None:
    """Write on this rank, or, for an FSDP2-sharded model on ranks other than 0, only
    take part in the gathers: ``order`` is every key the writer reads, in its order.

    Every rank returns together. If the writer fails, it first joins the gathers the
    other ranks are still waiting in, then all ranks raise (rank 0 its own error),
    so that no rank hangs in a collective and the process group stays usable.
    """
    import torch.distributed as dist

    sharded = [t for t in st.tensors.values() if is_sharded(t)]
    if not (sharded and dist.is_available() and dist.is_initialized()):
        write()
        return
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        st.reads = 0
        try:
            write()
        except Exception as err:
            failure = err
            for key in order[st.reads :]:
                st.get(key)
    else:
        for key in order:
            st.get(key)
    if any_rank(failure is not None, sharded[0].device):
        if failure is not None:
            raise failure
        raise RuntimeError(
            "mdparam: rank 0 failed to write the checkpoint (see its error); every rank "
            "stops here together and nothing was written. Fix what rank 0 reports (a full "
            "disk, a path, the metadata) and call the save again on every rank"
        )


def _compare_names(expected: list[str], found: list[str], source: str, what: str) -> None:
    missing = [k for k in expected if k not in set(found)]
    unexpected = [k for k in found if k not in set(expected)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise ValueError(f"{source} does not match the model ({'; '.join(parts)}). {what}")


def _check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...], source: str) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(
            f"{source}: tensor {name!r} has shape {tuple(got)}, the model has {tuple(want)}; "
            "the checkpoint was made for a different architecture or size"
        )


def load_training(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint written by ``save_training`` into a registered model.

    The model must be registered with the same layers and options as the one
    that was saved; everything is checked before anything is copied.

    Examples:
        >>> import os, tempfile, torch, mdparam
        >>> model, other = (torch.nn.Sequential(torch.nn.Linear(4, 4)) for _ in range(2))
        >>> _ = mdparam.register(model), mdparam.register(other)
        >>> path = mdparam.save_training(model, os.path.join(tempfile.mkdtemp(), "t.safetensors"))
        >>> mdparam.load_training(other, path)
        >>> torch.equal(other[0].weight, model[0].weight)
        True
    """
    st = _state(model, "load_training", loading=True)
    with CheckpointReader(path) as reader:
        specs = parse_training_metadata(reader.metadata, str(path))
        _compare_names(
            list(st.specs),
            list(specs),
            str(path),
            "The parametrized tensors differ: register the model as it was when saved.",
        )
        for name, spec in specs.items():
            mine = st.specs[name].config
            _check_shape(name, spec.config.shape, mine.shape, str(path))
            diff = [
                f"{f}={getattr(spec.config, f)!r} (model: {getattr(mine, f)!r})"
                for f in ("gains", "sphere", "gain_map", "layout", "radius")
                if getattr(spec.config, f) != getattr(mine, f)
            ]
            if diff:
                raise ValueError(
                    f"{path}: {name!r} was saved with {', '.join(diff)}; register the model "
                    "with the same options as when it was saved"
                )
        _compare_names(
            st.keys,
            list(reader.entries),
            str(path),
            "Build and register the model as it was when saved.",
        )
        for k in st.keys:
            _check_shape(k, reader.entries[k].shape, tuple(st.tensors[k].shape), str(path))
        with torch.no_grad():
            for k in st.keys:
                st.tensors[k].copy_(reader.get(k))
    refresh_kept(model)


def load_plain(model: nn.Module, source: str | os.PathLike | Mapping[str, Tensor]) -> None:
    """Load plain (never-parametrized) weights into a registered model.

    Each fused tensor is split by the parametrization's right inverse (D the
    projected weight, the gains taking up its norm), so the registered model
    then computes what the plain weights compute: fine-tuning with MD starts
    from the pretrained function. ``source`` is a safetensors file, a sharded
    directory, or an in-memory state dict. Every name and shape is checked,
    and every split computed, before anything in the model changes.

    Examples:
        >>> import torch, mdparam
        >>> pretrained = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = mdparam.register(model)
        >>> mdparam.load_plain(model, pretrained.state_dict())
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(model(x), pretrained(x), atol=1e-6)
        True
    """
    st = _state(model, "load_plain", loading=True)
    plan = plain_plan(st.keys, st.specs)
    label = "the state dict" if isinstance(source, Mapping) else str(source)
    reader, names, shape_of, get = _plain_source(source, label)
    try:
        read_as = _stand_ins(st, plan, names)
        for name, other in read_as.items():
            names, shape_of[name] = [*names, name], shape_of[other]
        _compare_names(
            [n for n, _ in plan], names, label, "Is it a checkpoint of this architecture?"
        )
        for name, src in plan:
            want = src.config.shape if isinstance(src, FusedSpec) else tuple(st.tensors[src].shape)
            _check_shape(name, shape_of[name], want, label)
        with torch.no_grad():
            new = _split_plain(st, plan, lambda k: get(read_as.get(k, k)), label)
            for dest, value in new:  # everything computed first, copied last
                dest.copy_(value)
        refresh_kept(model)
    finally:
        if reader is not None:
            reader.close()


def _plain_source(source: str | os.PathLike | Mapping[str, Tensor], label: str):
    """(reader or None, names, shapes by name, get(name)) of a plain checkpoint or state dict."""
    if isinstance(source, Mapping):
        shapes = {k: tuple(v.shape) for k, v in source.items()}
        return None, list(source), shapes, lambda k: source[k].detach()
    reader = CheckpointReader(source)
    try:
        check_kind(reader.metadata, "plain", label)
    except BaseException:
        reader.close()
        raise
    shapes = {k: e.shape for k, e in reader.entries.items()}
    return reader, list(reader.entries), shapes, reader.get


def _stand_ins(st: _State, plan, names: list[str]) -> dict[str, str]:
    """Missing names of tied weights -> another name of the same tensor that is present.

    A tied weight may be saved under one of its names only (save_pretrained does that).
    """

    def tensor_id(src: FusedSpec | str) -> int:
        if isinstance(src, FusedSpec):
            e = st.entries[src.name][0]
            return id(e.module.parametrizations[e.tensor_name].original0)
        return id(st.tensors[src])

    present = set(names)
    by_tensor: dict[int, list[str]] = {}
    for name, src in plan:
        by_tensor.setdefault(tensor_id(src), []).append(name)
    read_as = {}
    for name, src in plan:
        stand_in = [n for n in by_tensor[tensor_id(src)] if n in present]
        if name not in present and stand_in:
            read_as[name] = stand_in[0]
    return read_as


def _split_plain(st: _State, plan, read: Callable[[str], Tensor], label: str):
    """(destination, value) pairs: plain tensors as they are, fused ones split into originals."""
    new: list[tuple[Tensor, Tensor]] = []
    done: dict[int, tuple[str, Tensor]] = {}
    for name, src in plan:
        value = read(name)
        if not isinstance(src, FusedSpec):
            new.append((st.tensors[src], value))
            continue
        entry = st.entries[name][0]
        plist = entry.module.parametrizations[entry.tensor_name]
        direction = plist.original0
        if id(direction) in done:  # tied="share": one set of originals
            other, before = done[id(direction)]
            if not torch.equal(before, value):
                raise ValueError(
                    f"{label}: {name!r} and {other!r} share one direction in this model "
                    "(tied='share') but differ in the checkpoint"
                )
            continue
        done[id(direction)] = (name, value)
        try:
            parts = plist[0].right_inverse(value.to(direction.dtype))
        except ValueError as e:
            raise ValueError(f"{label}: {name!r}: {e}") from None
        new.extend(zip(originals(plist), parts))
    return new
