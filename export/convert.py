"""Kept so that ``from export.convert import convert, main`` works from a checkout.

The converter is the ``mdparam-export`` command (``python -m export`` in a checkout);
its code is internal to mdparam.
"""

from mdparam._convert import DTYPES, convert, main

__all__ = ["DTYPES", "convert", "main"]
