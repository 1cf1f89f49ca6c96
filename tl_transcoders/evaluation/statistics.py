"""Means with standard errors: the error bars of the splice report and of the
interpretability measures.

`Estimate` is a float that carries its standard error (`x.se`), so a report field reads
as the number it always was and still says how sure it is. The splice report's errors
are over rows (token sequences): each row contributes its mean per-token CE or KL, all
rows having the same length, so the mean of the row means is the mean over tokens.
`mean_estimate`, `difference_estimate` (paired, row by row) and `ratio_estimate` (the
delta method, for CE recovered) compute them from per-row tensors.

FVU, the fraction of variance unexplained, is `fvu` on one batch (differentiable: the
training loss) and `RunningFVU` over a stream of batches (the splice report), the same
quantity over all tokens seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from jaxtyping import Float
from torch import Tensor

__all__ = [
    "Estimate",
    "RunningFVU",
    "SumRanks",
    "difference_estimate",
    "fvu",
    "mean_and_sem",
    "mean_estimate",
    "no_ranks",
    "ratio_estimate",
    "variance",
]


class Estimate(float):
    """A float with its standard error `se` (NaN when it cannot be estimated, e.g. from
    a single row). Arithmetic gives plain floats; `repr` shows `value ± se`."""

    se: float

    def __new__(cls, value: float, se: float = math.nan) -> Estimate:
        estimate = super().__new__(cls, value)
        estimate.se = float(se)
        return estimate

    def __reduce__(self):
        return (Estimate, (float(self), self.se))

    def __repr__(self) -> str:
        return f"{float(self):.6g} ± {self.se:.2g}"


def mean_and_sem(values: Sequence[float]) -> tuple[float, float]:
    """The mean of `values` and its standard error (sample std / sqrt(n)); the mean is
    NaN for no values, the standard error NaN for fewer than 2."""
    n = len(values)
    mean = sum(values) / n if n else math.nan
    sem = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else math.nan
    return mean, sem


def _sem(values: Tensor) -> float:
    n = values.numel()
    return (values.double().std() / math.sqrt(n)).item() if n > 1 else math.nan


def mean_estimate(rows: Float[Tensor, " n_rows"]) -> Estimate:
    """The mean of per-row values with its standard error over rows."""
    return Estimate(rows.double().mean().item(), _sem(rows))


def difference_estimate(a: Float[Tensor, " n_rows"], b: Float[Tensor, " n_rows"]) -> Estimate:
    """mean(a) - mean(b) for per-row values of the same rows, with the paired standard
    error (of the row-by-row differences)."""
    return mean_estimate(a.double() - b.double())


def ratio_estimate(numerator: Float[Tensor, " n_rows"], denominator: Float[Tensor, " n_rows"]) -> Estimate:
    """mean(numerator) / mean(denominator) over the same rows, with the delta-method
    standard error `sem(numerator - R * denominator) / |mean(denominator)|`; NaN when
    the denominator's mean is 0."""
    a, b = numerator.double(), denominator.double()
    b_mean = b.mean().item()
    if b_mean == 0 or not math.isfinite(b_mean):
        return Estimate(math.nan)
    ratio = a.mean().item() / b_mean
    return Estimate(ratio, _sem(a - ratio * b) / abs(b_mean))


SumRanks = Callable[[Tensor], Tensor]
"""Sums a tensor over the processes that share a batch (data-parallel training); the
identity (`no_ranks`) for one process."""


def no_ranks(total: Tensor) -> Tensor:
    """`SumRanks` of a single process."""
    return total


def variance(y: Float[Tensor, "n d"], sum_ranks: SumRanks = no_ranks) -> Tensor:
    """Total squared deviation of `y` from its mean over the (global) batch."""
    n = sum_ranks(y.new_tensor(float(y.shape[0])))
    mean = sum_ranks(y.detach().sum(0)) / n
    return sum_ranks((y.detach() - mean).pow(2).sum()).clamp_min(1e-12)


def fvu(y: Float[Tensor, "n d"], y_hat: Float[Tensor, "n d"], sum_ranks: SumRanks = no_ranks) -> Tensor:
    """Fraction of variance unexplained over a batch: this process's squared error over
    the global batch's variance (the full FVU when there is one process)."""
    return (y - y_hat).pow(2).sum() / variance(y, sum_ranks)


class RunningFVU:
    """`fvu` over all the rows of a stream of batches, accumulated in float64 on the
    batches' device: the squared error over the total variance around the stream's mean."""

    def __init__(self) -> None:
        self.squared_error = self.sum = self.sum_squares = None
        self.n = 0

    def update(self, y: Float[Tensor, "n d"], y_hat: Float[Tensor, "n d"]) -> None:
        y, y_hat = y.double(), y_hat.double()
        terms = ((y - y_hat).pow(2).sum(), y.sum(0), y.pow(2).sum())
        if self.sum is None:
            self.squared_error, self.sum, self.sum_squares = terms
        else:
            self.squared_error, self.sum, self.sum_squares = (
                a + b for a, b in zip((self.squared_error, self.sum, self.sum_squares), terms)
            )
        self.n += y.shape[0]

    def value(self) -> float:
        """The FVU so far (NaN before any row, or for a target without variance)."""
        if self.sum is None:
            return math.nan
        total = (self.sum_squares - self.sum.pow(2).sum() / self.n).item()
        return self.squared_error.item() / total if total > 0 else math.nan
