"""Standard errors of the splice report on constructed data with known answers, and FVU
over a stream equal to FVU over all rows at once."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

from tl_transcoders.evaluation.statistics import (
    Estimate,
    RunningFVU,
    difference_estimate,
    fvu,
    mean_and_sem,
    mean_estimate,
    ratio_estimate,
)


def test_mean_estimate_of_known_rows():
    estimate = mean_estimate(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert estimate == pytest.approx(2.5)
    assert estimate.se == pytest.approx(math.sqrt(5 / 3) / 2)  # sample std sqrt(5/3), n = 4
    assert math.isnan(mean_estimate(torch.tensor([7.0])).se), "one row gives no error bar"


def test_paired_difference_uses_the_row_by_row_differences():
    a = torch.tensor([3.0, 5.0, 7.0, 9.0])
    b = a - torch.tensor([1.0, 1.0, 1.0, 1.0])  # a constant shift: no uncertainty about the difference
    assert difference_estimate(a, b) == pytest.approx(1.0) and difference_estimate(a, b).se == pytest.approx(0.0)
    unpaired = math.sqrt(a.var().item() / 4 + b.var().item() / 4)
    assert unpaired > 1, "treating them as independent would have given a large error bar"


def test_ratio_estimate_is_the_delta_method():
    a = torch.tensor([2.0, 4.0, 3.0, 5.0, 6.0])
    b = torch.tensor([4.0, 7.0, 6.0, 9.0, 10.0])
    estimate = ratio_estimate(a, b)
    ratio = 20.0 / 36.0
    residual = a - ratio * b
    expected_se = residual.std().item() / math.sqrt(5) / (36.0 / 5)
    assert estimate == pytest.approx(ratio) and estimate.se == pytest.approx(expected_se)
    assert math.isnan(ratio_estimate(a, torch.zeros(5)))


def test_ratio_error_bar_matches_the_spread_of_resampled_ratios():
    generator = torch.Generator().manual_seed(0)
    b = 2 + torch.rand(400, generator=generator, dtype=torch.float64)
    a = 0.8 * b + 0.1 * torch.randn(400, generator=generator, dtype=torch.float64)
    estimate = ratio_estimate(a, b)
    resampled = []
    for _ in range(2000):
        rows = torch.randint(0, 400, (400,), generator=generator)
        resampled.append((a[rows].mean() / b[rows].mean()).item())
    assert estimate.se == pytest.approx(torch.tensor(resampled).std().item(), rel=0.1)


def test_an_estimate_is_a_float_with_its_error():
    x = Estimate(1.5, 0.25)
    assert x + 1 == 2.5 and isinstance(x * 2, float) and x > 1
    assert repr(x) == "1.5 ± 0.25"
    for copied in (pickle.loads(pickle.dumps(x)), copy.deepcopy(x)):
        assert copied == 1.5 and copied.se == 0.25


def test_mean_and_sem_of_a_list():
    assert mean_and_sem([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, math.sqrt(5 / 3) / 2))


def test_running_fvu_equals_fvu_over_all_rows():
    generator = torch.Generator().manual_seed(1)
    y = torch.randn(50, 6, generator=generator, dtype=torch.float64) + 3
    y_hat = y + 0.3 * torch.randn(50, 6, generator=generator, dtype=torch.float64)
    running = RunningFVU()
    for start in range(0, 50, 7):
        running.update(y[start : start + 7], y_hat[start : start + 7])
    assert running.value() == pytest.approx(fvu(y, y_hat).item(), rel=1e-12)
    assert math.isnan(RunningFVU().value())
