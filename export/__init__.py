"""The checkpoint side: a training checkpoint file in, a plain checkpoint file out.

    python -m export IN OUT [--dtype bfloat16] [--force]

Works from the file alone (the header says how each tensor is parametrized);
the model's class is never imported or built. See :func:`export.convert.convert`.
"""

from .convert import convert

__all__ = ["convert"]
