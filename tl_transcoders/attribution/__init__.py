"""Circuit attribution with transcoders.

Input-invariant (weights only): `feature_weights`, `embedding_weights`, `logit_weights`
and the blockwise top-k queries `top_upstream`, `top_downstream`, `top_tokens`,
`top_logits`, `top_connections`.
Input-dependent (one prompt): `run_prompt`, `path_contribution`, `find_paths`.
Attribution graphs: `attribute` -> `Graph` (`estimate_attribution_memory` predicts its
peak memory); `prune`, `graph_scores`, `export_graph` (circuit-tracer's graph files),
`plot_graph` (plotly); `intervene` to check a graph against the model;
`generate_steered` to generate text with features held; `attribute_qk` to split an
attention score into pairs of nodes.
"""

from tl_transcoders.attribution.attribute import attribute, estimate_attribution_memory
from tl_transcoders.attribution.errors import AttributionError, GraphFileError
from tl_transcoders.attribution.export import export_graph, graph_json
from tl_transcoders.attribution.graph import Graph
from tl_transcoders.attribution.interventions import FeatureEdit, InterventionResult, intervene, zero
from tl_transcoders.attribution.paths import Node, Path, find_paths, path_contribution, run_prompt
from tl_transcoders.attribution.plot import plot_graph
from tl_transcoders.attribution.prune import graph_scores, prune
from tl_transcoders.attribution.qk import QKAttribution, attribute_qk
from tl_transcoders.attribution.steering import SteeredGeneration, generate_steered
from tl_transcoders.attribution.virtual_weights import (
    Head,
    embedding_weights,
    feature_weights,
    logit_weights,
    top_connections,
    top_downstream,
    top_logits,
    top_tokens,
    top_upstream,
)

__all__ = [
    "AttributionError",
    "FeatureEdit",
    "Graph",
    "GraphFileError",
    "Head",
    "InterventionResult",
    "Node",
    "Path",
    "QKAttribution",
    "SteeredGeneration",
    "attribute",
    "attribute_qk",
    "embedding_weights",
    "estimate_attribution_memory",
    "export_graph",
    "feature_weights",
    "find_paths",
    "generate_steered",
    "graph_json",
    "graph_scores",
    "intervene",
    "logit_weights",
    "path_contribution",
    "plot_graph",
    "prune",
    "run_prompt",
    "top_connections",
    "top_downstream",
    "top_logits",
    "top_tokens",
    "top_upstream",
    "zero",
]
