"""The errors of the analysis tools (dashboards, probing, autointerp, comparisons)."""

from __future__ import annotations

import torch
from torch import Tensor

from tl_transcoders.core.errors import TranscodersError

__all__ = ["AnalysisError", "check_finite_activations"]


class AnalysisError(TranscodersError, ValueError):
    """An analysis asked of something it cannot measure: bad latents, options or inputs."""


def check_finite_activations(x: Tensor, site: str) -> None:
    """Refuse the model's activations `x` at `site` if they hold NaN or inf (an analysis
    of them would report every latent dead, or NaN)."""
    if not torch.isfinite(x).all():
        raise AnalysisError(
            f"the model's activations at {site} hold NaN or inf on these tokens; check its weights and "
            "dtype (fp16 overflows easily) before analysing its transcoders"
        )
