"""What mdparam writes in a safetensors header, and the plan that fuses a checkpoint.

Two kinds of file, told apart by the header key ``mdparam.kind``:

- ``training``: the registered model's own state (directions, raw gains and
  everything else under their state-dict names). ``mdparam.tensors`` maps
  each plain tensor name to its configuration (``MDConfig``) and the
  names of its originals, so the file alone is enough to fuse it.
- ``plain``: fused weights under the names a never-parametrized model has.
  ``mdparam.fused`` lists which tensors were fused.

Both also carry ``format: pt`` (which transformers checks) and
``mdparam.format_version``. A sharded checkpoint is a directory with
``model.safetensors.index.json`` (``{"metadata": ..., "weight_map": ...}``)
whose metadata holds the same keys.

``plain_plan`` and ``fuse_spec`` turn a training state into a plain
one; the in-memory exporter and the file-to-file converter both use them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor

from ._parametrization import MDConfig, fuse
from ._version import __version__

__all__ = [
    "FORMAT_VERSION",
    "FusedSpec",
    "check_kind",
    "fuse_spec",
    "parse_training_metadata",
    "plain_metadata",
    "plain_plan",
    "training_metadata",
]

FORMAT_VERSION = "1"
KIND = "mdparam.kind"
VERSION = "mdparam.format_version"
LIB_VERSION = "mdparam.version"
TENSORS = "mdparam.tensors"
FUSED = "mdparam.fused"


@dataclass(frozen=True)
class FusedSpec:
    """One parametrized tensor in a training state: how to fuse it, from which keys."""

    name: str  # the plain tensor name, e.g. "blocks.0.attn.q.weight"
    config: MDConfig
    originals: tuple[str, ...]  # state keys: direction first, then raw gains
    radius: str | None  # state key of a per-unit radius tensor, if any

    def to_dict(self) -> dict:
        return {
            "config": json.loads(self.config.to_json()),
            "originals": list(self.originals),
            "radius": self.radius,
        }


def _base(extra: Mapping[str, str] | None, kind: str) -> dict[str, str]:
    meta = {"format": "pt", KIND: kind, VERSION: FORMAT_VERSION, LIB_VERSION: __version__}
    for k, v in (extra or {}).items():
        if not (isinstance(k, str) and isinstance(v, str)):
            raise TypeError(f"metadata must map str to str; got {k!r}: {v!r}")
        if k in meta or k.startswith("mdparam."):
            raise ValueError(f"metadata key {k!r} is reserved by mdparam; choose another name")
        meta[k] = v
    return meta


def training_metadata(
    specs: Iterable[FusedSpec], extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    meta = _base(extra, "training")
    meta[TENSORS] = json.dumps({s.name: s.to_dict() for s in specs}, sort_keys=True)
    return meta


def plain_metadata(fused: Iterable[str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    meta = _base(extra, "plain")
    # sorted: one header whatever order the tensors were read in (safetensors < 0.5.3
    # lists a file's tensors by name, not in file order)
    meta[FUSED] = json.dumps(sorted(fused))
    return meta


def check_kind(meta: Mapping[str, str], expected: str, source: str) -> None:
    """Raise a clear error unless ``meta`` is an mdparam header of kind ``expected``."""
    kind = meta.get(KIND)
    if kind is None:
        if expected == "training":
            raise ValueError(
                f"{source} has no mdparam training header (mdparam.kind): it is not a training "
                "checkpoint written by mdparam.save_training. A plain checkpoint has nothing to "
                "fuse; load it with mdparam.load_plain(model, path) or load_state_dict"
            )
        return  # a plain checkpoint from anywhere (save_pretrained, save_file) is fine
    version = meta.get(VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{source} has mdparam format version {version!r}; this mdparam reads version "
            f"{FORMAT_VERSION!r}. Use the mdparam version that wrote it (mdparam.version = "
            f"{meta.get(LIB_VERSION)!r}) or re-export it"
        )
    if kind == expected:
        return
    if kind == "plain":
        raise ValueError(
            f"{source} is a plain checkpoint (fused weights, mdparam.kind='plain'), not a "
            "training checkpoint: it has no directions or gains. Load it into a registered "
            "model with mdparam.load_plain(model, path), or into a plain model with load_state_dict"
        )
    if kind == "training":
        raise ValueError(
            f"{source} is an mdparam training checkpoint (directions and gains, "
            "mdparam.kind='training'), not a plain one. Resume with "
            "mdparam.load_training(model, path), or fuse it first: mdparam-export IN OUT"
        )
    raise ValueError(
        f"{source} has unknown mdparam.kind {kind!r}; expected {expected!r}. It was written by "
        f"another mdparam version (mdparam.version = {meta.get(LIB_VERSION)!r}): use that version"
    )


def parse_training_metadata(meta: Mapping[str, str], source: str) -> dict[str, FusedSpec]:
    """The fused-tensor specs of a training header (validated)."""
    check_kind(meta, "training", source)
    try:
        raw = json.loads(meta[TENSORS])
        return {
            name: FusedSpec(
                name,
                MDConfig.from_dict(d["config"]),
                tuple(d["originals"]),
                d.get("radius"),
            )
            for name, d in raw.items()
        }
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{source}: the mdparam.tensors header is missing or malformed ({e}); the file was "
            "not written by mdparam.save_training or was edited"
        ) from None


def plain_plan(
    keys: Iterable[str], specs: Mapping[str, FusedSpec]
) -> list[tuple[str, FusedSpec | str]]:
    """Output names in order, each with its source: a state key to copy, or a spec to fuse.

    A fused tensor takes the place of its direction; the other originals and
    radius tensors are dropped.
    """
    keys = list(keys)
    present = set(keys)
    for s in specs.values():
        absent = [k for k in s.originals if k not in present]
        if absent:
            raise ValueError(f"the state has no tensor {absent[0]!r}, an original of {s.name!r}")
    first = {s.originals[0]: s for s in specs.values()}
    dropped = {k for s in specs.values() for k in s.originals[1:]}
    dropped |= {s.radius for s in specs.values() if s.radius is not None}
    plan: list[tuple[str, FusedSpec | str]] = []
    for key in keys:
        if key in first:
            plan.append((first[key].name, first[key]))
        elif key not in dropped:
            plan.append((key, key))
    return plan


def fuse_spec(spec: FusedSpec, get: Callable[[str], Tensor], *, inplace: bool = False) -> Tensor:
    """The fused tensor of ``spec``, reading its originals with ``get(key)``.

    ``inplace=True`` fuses into the direction tensor ``get`` returned (for a
    reader that hands out private copies: one tensor of memory, not three).
    """
    direction, *gains = (get(k) for k in spec.originals)  # in order: gathers must match
    return fuse(direction, tuple(gains), spec.config, inplace=inplace)
