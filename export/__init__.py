"""The converter's entry point in a checkout of the repository: ``python -m export IN OUT``.

The code is internal to mdparam (installed with it as the ``mdparam-export``
command). This folder is
not installed: it only keeps ``python -m export`` and ``import export``
working from the repository's root.
"""

# Through the submodule first, so that ``export.convert`` ends up naming the
# function (as it always did), not the submodule export/convert.py.
from .convert import convert, main

__all__ = ["convert", "main"]
