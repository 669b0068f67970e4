"""The torch.optim internals ``mdparam.compile_step`` relies on, in one pinned place.

A compiled step calls an optimizer's undecorated step body (torch's decorated
``step()`` graph-breaks around it to switch grad mode off), so it must run
the optimizer's hooks and tell LR schedulers that a step happened itself.
tests/test_compiled_step.py fails if torch changes what these rely on.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["mark_stepped", "undecorated_step", "with_step_hooks"]

R = TypeVar("R")


def undecorated_step(optimizer: torch.optim.Optimizer) -> Callable[[torch.optim.Optimizer], object]:
    """The optimizer class's step body without torch's hook and grad-mode wrappers."""
    return inspect.unwrap(type(optimizer).step)


def with_step_hooks(
    body: Callable[[torch.optim.Optimizer], R],
) -> Callable[[torch.optim.Optimizer], R]:
    """``body(optimizer)`` wrapped as torch wraps ``step()``: global and per-optimizer pre-
    and post-step hooks, and the profiler label."""
    return torch.optim.Optimizer.profile_hook_step(body)


def mark_stepped(optimizer: torch.optim.Optimizer) -> None:
    """Record a step the way an LR scheduler's wrapper of ``optimizer.step`` does."""
    # torch internal: schedulers read this flag to warn when step() comes after sched.step()
    optimizer._opt_called = True
