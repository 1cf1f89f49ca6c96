"""The errors of the analysis tools (dashboards, probing, autointerp, comparisons)."""

from __future__ import annotations

from tl_transcoders.core.errors import TranscodersError

__all__ = ["AnalysisError"]


class AnalysisError(TranscodersError, ValueError):
    """An analysis asked of something it cannot measure: bad latents, options or inputs."""
