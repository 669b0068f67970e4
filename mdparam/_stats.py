"""Training diagnostics: what the gains are, and how far each direction moved."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from ._tree import full_tensor, registered, unique_directions, unwrap

__all__ = ["Stats", "stats"]


def _sketch_matrix(
    name: str, rows: int, d_out: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, d_out, generator=g, dtype=torch.float32) / rows**0.5).to(
        device, dtype
    )


@torch.no_grad()
def stats(
    model: nn.Module, *, exact: bool = False, sketch_rows: int = 32, per_layer: bool = True
) -> dict[str, float]:
    """A flat dict of MD diagnostics, ready for any logger (TensorBoard, W&B, print).

    For every parametrized tensor ``name`` (and, without the name, over all of
    them: means averaged, minima and maxima taken over the layers):

    - ``mdparam/{name}/row_gain_mean``, ``_min``, ``_max``: phi(r), the row
      magnitudes; likewise ``col_gain_*`` and ``scalar_gain_*``;
    - ``mdparam/{name}/direction_step``: ||D_now - D_then|| / ||D_now||, the
      relative (angular) change of the direction since the previous call
      (so, called after every optimizer step, the step the learning rate is
      meant to set). Absent on the first call.

    The direction step needs something of the previous direction. By default
    a random sketch is kept: S D for a fixed Gaussian S of ``sketch_rows`` x
    d_out, so ||S (D_now - D_then)|| estimates the change from
    ``sketch_rows`` x d_in numbers per matrix (a few percent error at the
    default 32 rows). ``exact=True`` keeps a full copy of every direction
    instead. Under FSDP2 call it on every rank (it gathers the directions).

    This function remembers each model's last record on the model itself (a
    plain attribute, not in its ``state_dict``), so it goes with the model.
    ``Stats`` keeps the record in an object you hold instead.

    Examples:
        >>> import torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = mdparam.register(model, init="sphere")
        >>> s = mdparam.stats(model)
        >>> round(s["mdparam/row_gain_mean"], 4), "mdparam/direction_step" in s
        (1.0, False)
        >>> opt = torch.optim.SGD(mdparam.param_groups(model, lr=0.1))
        >>> _ = mdparam.Retraction(model).attach(opt)
        >>> model(torch.randn(4, 8)).square().mean().backward(); opt.step()
        >>> 0 < mdparam.stats(model)["mdparam/direction_step"] < 1
        True
    """
    records = unwrap(model).__dict__.setdefault(_RECORD_ATTR, {})
    return _collect(model, records, exact=exact, sketch_rows=sketch_rows, per_layer=per_layer)


class Stats:
    """``stats`` with its record of the previous directions held here, not in a global table.

    Examples:
        >>> import torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = mdparam.register(model, init="sphere")
        >>> tracker = mdparam.Stats(model, exact=True)
        >>> "mdparam/direction_step" in tracker()
        False
        >>> tracker()["mdparam/direction_step"]  # nothing moved since the last call
        0.0
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        exact: bool = False,
        sketch_rows: int = 32,
        per_layer: bool = True,
    ) -> None:
        self.model = model
        self.exact, self.sketch_rows, self.per_layer = exact, sketch_rows, per_layer
        self.records: dict[str, tuple[str, Tensor]] = {}  # layer name -> the last call's record

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        return _collect(
            self.model,
            self.records,
            exact=self.exact,
            sketch_rows=self.sketch_rows,
            per_layer=self.per_layer,
        )


_RECORD_ATTR = "_mdparam_stats_records"  # stats()'s record, kept on the model it describes


def _collect(
    model: nn.Module,
    records: dict[str, tuple[str, Tensor]],
    *,
    exact: bool,
    sketch_rows: int,
    per_layer: bool,
) -> dict[str, float]:
    keys: list[tuple[str | None, str]] = []  # (layer name or None, statistic) for each value
    values: list[Tensor] = []
    for e in unique_directions(registered(unwrap(model))):
        cfg = e.config
        for role, raw in zip(cfg.roles[1:], e.gains):
            mag = cfg.geometry.gain_map(full_tensor(raw.detach()).float())
            keys += [(e.name, f"{role}_mean"), (e.name, f"{role}_min"), (e.name, f"{role}_max")]
            values += [mag.mean(), mag.min(), mag.max()]
        d = cfg.geometry.layout.to_matrix(full_tensor(e.direction.detach())).float()
        if exact:
            record = ("exact", d.clone())
        else:
            s = _sketch_matrix(e.name, sketch_rows, d.shape[-2], d.dtype, d.device)
            record = ("sketch", s @ d)
        previous = records.get(e.name)
        if (
            previous is not None
            and previous[0] == record[0]
            and previous[1].shape == record[1].shape
        ):
            keys.append((e.name, "direction_step"))
            values.append((record[1] - previous[1]).norm() / d.norm())
        records[e.name] = record
    numbers = torch.stack(values).tolist() if values else []  # one read-back for everything
    return _summarize(keys, numbers, per_layer)


def _summarize(keys: list, numbers: list[float], per_layer: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    per: dict[str, list[float]] = {}
    for (name, key), value in zip(keys, numbers):
        per.setdefault(key, []).append(value)
        if per_layer:
            out[f"mdparam/{name}/{key}"] = value
    for key, vals in per.items():
        if key.endswith("_min"):
            out[f"mdparam/{key}"] = min(vals)
        elif key.endswith("_max"):
            out[f"mdparam/{key}"] = max(vals)
        else:
            out[f"mdparam/{key}"] = sum(vals) / len(vals)
        if key == "direction_step":
            out["mdparam/direction_step_max"] = max(vals)
            out["mdparam/direction_step_min"] = min(vals)
    return out
