"""Kept so that ``from export.convert import convert, main`` works from a checkout.

The converter is :mod:`mdparam.convert`; import it from there.
"""

from mdparam.convert import DTYPES, convert, main

__all__ = ["DTYPES", "convert", "main"]
