"""The errors of circuit attribution."""

from __future__ import annotations

from tl_transcoders.core.errors import TranscodersError

__all__ = ["AttributionError", "GraphFileError"]


class AttributionError(TranscodersError, ValueError):
    """A query, prompt, edit or graph that does not fit the model: wrong layer order,
    unknown latent, a feature that is not active, ..."""


class GraphFileError(AttributionError):
    """A saved graph cannot be read: the message names the file and the problem."""
