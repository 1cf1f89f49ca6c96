"""Measurements shared by the benchmark scripts (standard library and torch only, so the
scripts that run in other tools' virtualenvs can import it too)."""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Current resident memory of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fvu(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained of `y_hat` against `y` ([tokens, d])."""
    y, y_hat = y.double(), y_hat.double()
    return ((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()
