"""Value checks every validating module shares: what counts as an integer and as a number.

bool is an int subclass in Python, but ``epochs: true`` in YAML or ``top_k=True`` from a caller
is almost surely a mistake, so neither check accepts it. NumPy's integers and floats count
(``numbers.Integral`` and ``numbers.Real`` include them), so values read from arrays pass too.
"""

from __future__ import annotations

import math
from numbers import Integral, Real


def is_int(value: object) -> bool:
    """An integer, not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A finite real number (an integer or a float), not a bool, NaN or infinity."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
