"""Kept so that ``from export.convert import convert, main`` works from a checkout.

The converter is :mod:`mdparam._convert`; import it from there.
"""

from mdparam._convert import DTYPES, convert, main

__all__ = ["DTYPES", "convert", "main"]
