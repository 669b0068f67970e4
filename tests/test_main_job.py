"""The main job end to end, in a tiny configuration."""

import json
import math

import pytest
import safetensors.torch

from examples import train_gpt
from examples.gpt import GPT, GPTConfig

TINY = "--steps 3 --width 32 --depth 1 --heads 2 --batch 2 --block 32 --eval-every 2 --sample-bytes 16 --quiet".split()


@pytest.mark.slow
def test_main_job_trains_compiled_exports_and_reloads(tmp_path):
    summary = train_gpt.main([*TINY, "--out", str(tmp_path)])
    assert summary["method"] == "md-muon"  # the recipe that measured best (docs/reproduction.md)
    assert summary["export"]["agree"]  # the strict load itself raises on a mismatch
    assert summary["export"]["max_rel_logit_diff"] <= 1e-5
    # q, k, v, o, up, down, and Muon's recipe puts embeddings and head on unit row spheres
    assert sorted(summary["registered"])[:3] == [
        "blocks.0.attn.k.weight",
        "blocks.0.attn.o.weight",
        "blocks.0.attn.q.weight",
    ]
    assert {"tok.weight", "pos.weight", "head.weight"} <= set(summary["registered"])
    assert len(summary["registered"]) == 9
    for name in ("model.safetensors", "loss.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert (
        json.loads((tmp_path / "summary.json").read_text())["corpus"]["sha256"]
        == summary["corpus"]["sha256"]
    )
    # the exported file is an ordinary checkpoint of the plain architecture
    plain = GPT(GPTConfig(256, 32, 1, 2, 32))
    plain.load_state_dict(safetensors.torch.load_file(tmp_path / "model.safetensors"), strict=True)


@pytest.mark.parametrize(
    "flags", [["--baseline"], ["--optimizer", "adamw"], ["--optimizer", "adamw", "--relative-step"]]
)
def test_main_job_other_modes(tmp_path, flags):
    summary = train_gpt.main([*TINY, "--no-compile", "--out", str(tmp_path), *flags])
    assert summary["export"]["agree"]
    assert math.isfinite(summary["val_loss"])


def test_main_job_refuses_contradictory_flags(tmp_path):
    with pytest.raises(SystemExit, match="drop --baseline"):
        train_gpt.main([*TINY, "--baseline", "--relative-step", "--out", str(tmp_path)])
