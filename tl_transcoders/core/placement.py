"""Where a transcoder sits in a model: one `Placement` per layer it replaces.

A `Transcoder` replaces one layer's MLP output; a `CrossLayerTranscoder` replaces every
covered layer's. Code that fits transcoders into a model (checks, splicing, evaluation)
goes over placements, so both kinds take one path.
"""

from __future__ import annotations

from typing import NamedTuple, TypeAlias

from tl_transcoders.core.clt import CrossLayerTranscoder
from tl_transcoders.core.transcoder import Transcoder

__all__ = ["AnyTranscoder", "Placement", "describe", "placements"]

AnyTranscoder: TypeAlias = Transcoder | CrossLayerTranscoder
"""A per-layer transcoder or a cross-layer transcoder."""


class Placement(NamedTuple):
    """One layer that `module` replaces: it reads `input_site` (width `d_in`) and
    writes `output_site` (width `d_out`); `index` is the layer's position among the
    module's layers (0 for a per-layer transcoder)."""

    module: AnyTranscoder
    layer: int
    index: int
    input_site: str
    output_site: str
    d_in: int
    d_out: int


def placements(module: AnyTranscoder) -> list[Placement]:
    """The layers `module` replaces, in order."""
    c = module.cfg
    if isinstance(module, CrossLayerTranscoder):
        return [
            Placement(module, layer, i, c.input_site(layer), c.output_site(layer), c.d_model, c.d_model)
            for i, layer in enumerate(c.layers)
        ]
    return [Placement(module, c.layer, 0, c.input_site, c.output_site, c.d_in, c.d_out)]


def describe(module: AnyTranscoder) -> str:
    """A short name for error messages: layers and sites."""
    c = module.cfg
    if isinstance(module, CrossLayerTranscoder):
        return f"cross-layer transcoder for layers {c.first_layer}..{c.layers[-1]}"
    return f"transcoder for layer {c.layer} ({c.input_site} -> {c.output_site})"
