"""examples/train_distributed.py end to end: launched by torchrun, one process (gloo on CPU), tiny."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = "--width 32 --depth 1 --block 16 --global-batch 2".split()


def train_distributed(out: Path, *flags: str, procs: int = 1) -> dict[int, float]:
    """One run of the example (torchrun --standalone: a free port); the losses it printed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(procs), "-m", "examples.train_distributed", *TINY]
    cmd += ["--out", str(out), *flags]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    # "step     3  loss 3.9959"
    return {
        int(words[1]): float(words[3])
        for words in map(str.split, run.stdout.splitlines())
        if words[:1] == ["step"]
    }


@pytest.mark.slow
def test_compile_step_checkpoint_resumes_where_the_run_left_off(tmp_path):
    # the scheduler's LRs are tensors under --compile-step; DCP once saved them under
    # other keys than a fresh scheduler asks for ("Missing key ... sched._last_lr")
    whole = train_distributed(tmp_path, "--steps", "4", "--compile-step", "--save-every", "3")
    resumed = train_distributed(tmp_path, "--steps", "4", "--compile-step", "--resume")
    assert resumed == {3: whole[3]}


@pytest.mark.slow
def test_compile_step_continues_a_finished_run_for_more_steps(tmp_path):
    # the checkpoint of a finished run holds LR 0 (the end of its decay); the resumed,
    # longer run once took its first step at that LR, which made the compiled AdamW
    # write NaN into the embedding rows not seen yet (RetractionError a step later)
    train_distributed(tmp_path, "--steps", "2", "--save-every", "2")
    compiled = train_distributed(tmp_path, "--steps", "4", "--compile-step", "--resume")
    eager = train_distributed(tmp_path, "--steps", "4", "--resume")
    assert math.isfinite(compiled[3])
    assert compiled[3] == pytest.approx(eager[3], abs=2e-4)


@pytest.mark.slow
def test_compile_step_clips_tensor_parallel_gradients(tmp_path):
    # torch's clip_grad_norm_ cannot mix the sharded (DTensor) and plain gradients of a
    # tensor-parallel model; mdparam's clipping takes a global norm over both
    flags = ["--steps", "3", "--tp", "2", "--width", "64"]
    compiled = train_distributed(tmp_path / "c", *flags, "--compile-step", procs=2)
    eager = train_distributed(tmp_path / "e", *flags, procs=2)
    assert compiled[2] == pytest.approx(eager[2], abs=2e-4)
