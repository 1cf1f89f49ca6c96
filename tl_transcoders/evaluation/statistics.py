"""Summary statistics shared by the interpretability measures."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_and_sem(values: Sequence[float]) -> tuple[float, float]:
    """The mean of `values` and its standard error (sample std / sqrt(n)); the mean is
    NaN for no values, the standard error NaN for fewer than 2."""
    n = len(values)
    mean = sum(values) / n if n else math.nan
    sem = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else math.nan
    return mean, sem
