"""Training runs in a process pool, saved to a resumable JSON file.

The reproduction sweep (reproduce.py) and the recipe ablation (ablation.py)
both submit jobs ({"key", "config", ...}) of examples/methods.py runs: eager,
one thread each, as many at once as workers. Every finished run is written
to the results file at once, so an interrupted command resumes where it
stopped.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RESULTS = ROOT / "benchmarks" / "results"

_CORPUS = None


def _init_worker() -> None:
    global _CORPUS
    import torch

    torch.set_num_threads(1)
    from examples.corpus import load_corpus

    _CORPUS = load_corpus()


def _run(job: dict) -> tuple[str, dict]:
    from examples.methods import RunConfig, train

    res = train(RunConfig(**job["config"]), _CORPUS)
    res.pop("_setup")
    losses = res.pop("train_losses")
    stride = max(1, len(losses) // 100)
    res["curve"] = [
        (i + 1, sum(losses[i : i + stride]) / len(losses[i : i + stride]))
        for i in range(0, len(losses), stride)
    ]
    res.update({k: v for k, v in job.items() if k not in ("key", "config")})
    return job["key"], res


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def resume(path: Path, settings: dict) -> dict:
    """The results in ``path`` if they were made with ``settings`` (or none yet); else exit."""
    data = load(path)
    if data["runs"] and data.get("settings") != settings:
        raise SystemExit(
            f"{path} holds runs made with other settings ({data.get('settings')}); pass "
            "--results NEW.json to start a separate file, or the same settings to resume"
        )
    data["settings"] = settings
    return data


def save(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def score(r: dict) -> float:
    """A run's validation loss; a diverged run (or NaN) counts as infinitely bad."""
    v = r["val_loss"]
    return v if (v == v and not r["diverged"]) else math.inf


def describe(res: dict) -> str:
    c = res["config"]
    return (
        f"  {c['method']:>18} w{c['width']:<4} lr {c['lr']:<8.4g} seed {c['seed']} "
        f"{res.get('label', '')}: val {res['val_loss']:.4f}"
        f"{' (diverged)' if res['diverged'] else ''} [{res['seconds']:.0f}s]"
    )


def run_rounds(
    path: Path,
    data: dict,
    next_jobs: Callable[[dict], Iterable[dict]],
    workers: int,
) -> None:
    """Run ``next_jobs(data)`` until it returns nothing new; save after every run."""
    started, base = time.time(), data.get("wall_seconds", 0.0)
    failed: list[tuple[str, str]] = []
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
        while True:
            jobs = [j for j in next_jobs(data) if j["key"] not in data["runs"]]
            if not jobs:
                break
            print(
                f"[runs] {len(jobs)} runs in this round ({len(data['runs'])} done)",
                file=sys.stderr,
                flush=True,
            )
            futures = {pool.submit(_run, j): j for j in jobs}
            for fut in as_completed(futures):
                try:
                    key, res = fut.result()
                except Exception as e:  # one broken job must not waste the others
                    failed.append((futures[fut]["key"], repr(e)))
                    print(f"  FAILED {failed[-1][0]}: {failed[-1][1]}", file=sys.stderr, flush=True)
                    continue
                data["runs"][key] = res
                data["wall_seconds"] = base + time.time() - started  # kept if interrupted
                save(path, data)
                print(describe(res), file=sys.stderr, flush=True)
            if failed:
                break  # the next round would submit the failed jobs again
    data["wall_seconds"] = base + time.time() - started
    save(path, data)
    if failed:
        raise SystemExit(
            f"{len(failed)} runs failed (the others are saved in {path}): "
            + "; ".join(f"{k}: {e}" for k, e in failed)
        )
