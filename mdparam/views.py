"""Deprecated alias of :mod:`mdparam.layouts` (renamed in 0.2.0; removed in the next release)."""

import warnings

from .layouts import (
    LAYOUTS,
    from_matrix,
    is_view,
    matrix_dim,
    matrix_shape,
    to_matrix,
    write_back,
)

__all__ = [
    "LAYOUTS",
    "from_matrix",
    "is_view",
    "matrix_dim",
    "matrix_shape",
    "to_matrix",
    "write_back",
]

warnings.warn(
    "mdparam.views is now mdparam.layouts; import from there (the alias goes in the next release)",
    DeprecationWarning,
    stacklevel=2,
)
