"""Influence on the logits, pruning and scores of an attribution `Graph` (the
circuit-tracer definitions).

Influence works on the row-normalised absolute adjacency `N = |A| / rowsum|A|`: the
influence of node s on target t summed over all paths is `(N + N^2 + ...)[t, s]`, finite
because a graph is a DAG (N is nilpotent). A node's influence on the logits weights the
logit rows by the logit probabilities: `w @ (N + N^2 + ...)`, `w` the probabilities on
the logit nodes and zero elsewhere.

Pruning keeps the nodes with the largest influence until they hold `node_threshold` of
the total, then the edges with the largest influence (normalised weight times the
influence of its target plus its target's own logit weight, in the node-pruned graph)
until they hold `edge_threshold`, then repeatedly drops feature and error nodes left
without an outgoing edge and feature nodes left without an incoming edge. Token and
logit nodes are always kept.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_transcoders.attribution.errors import AttributionError
from tl_transcoders.attribution.graph import Graph

__all__ = [
    "GraphScores",
    "PruneResult",
    "check_thresholds",
    "cumulative_share",
    "graph_scores",
    "keep_top",
    "logit_node_weights",
    "node_influence",
    "normalized_adjacency",
    "path_influence",
    "prune",
]


class PruneResult(NamedTuple):
    """Masks over the original graph's nodes and edges, and the pruned graph."""

    node_mask: Bool[Tensor, " n_nodes"]
    edge_mask: Bool[Tensor, "n_nodes n_nodes"]  # [target, source]
    cumulative_influence: Float[Tensor, " n_nodes"]  # share of the total held by this node and all larger ones
    graph: Graph


class GraphScores(NamedTuple):
    replacement: float  # influence reaching the logits from tokens / (from tokens + from errors)
    completeness: float  # influence-weighted share of node inputs that come from non-error nodes


def normalized_adjacency(adjacency: Float[Tensor, "n n"]) -> Float[Tensor, "n n"]:
    """`|A|` with every row divided by its sum (rows summing to zero stay zero)."""
    magnitude = adjacency.abs()
    return magnitude / magnitude.sum(dim=1, keepdim=True).clamp(min=1e-10)


def path_influence(normalized: Float[Tensor, "n n"], weights: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """`weights @ (N + N^2 + ...)`: each node's influence on the weighted targets over paths
    of every length. Raises `AttributionError` when a cycle is reachable from the weighted
    targets (N is not nilpotent there), judged on N's non-zero pattern, since products
    along a cycle can underflow to zero."""
    pattern = (normalized != 0).to(normalized.dtype)
    step = weights @ normalized
    total = step.clone()
    reach = (weights != 0).to(normalized.dtype) @ pattern  # non-zero where a path of this length arrives
    for _ in range(normalized.shape[0]):
        if not reach.any():
            return total
        if step.any():
            step = step @ normalized
            total += step
        reach = (reach != 0).to(normalized.dtype) @ pattern
    raise AttributionError("the adjacency has a cycle: an attribution graph must be a DAG")


def logit_node_weights(graph: Graph) -> Float[Tensor, " n_nodes"]:
    """The logit probabilities on the logit nodes, zero on every other node."""
    weights = torch.zeros(graph.n_nodes, dtype=_dtype(graph), device=graph.adjacency.device)
    weights[graph.logit_node(0) :] = graph.logit_probabilities.to(weights.dtype)
    return weights


def node_influence(graph: Graph) -> Float[Tensor, " n_nodes"]:
    """Every node's influence on the logits (zero for the logit nodes themselves)."""
    return path_influence(normalized_adjacency(graph.adjacency.to(_dtype(graph))), logit_node_weights(graph))


def cumulative_share(scores: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """For each entry, the share of `scores.sum()` held by it and all larger entries."""
    _, order, shares = _sorted_shares(scores)
    cumulative = torch.empty_like(shares)
    cumulative[order] = shares
    return cumulative


def keep_top(scores: Float[Tensor, " n"], threshold: float) -> Bool[Tensor, " n"]:
    """Entries at least as large as the one at which the cumulative share (largest first)
    first reaches `threshold` (the smallest entry where rounding never lets it get there)."""
    ordered, _, shares = _sorted_shares(scores)
    index = int(torch.searchsorted(shares, shares.new_tensor([threshold])))
    return scores >= ordered[min(index, len(ordered) - 1)]


def check_thresholds(node_threshold: Any, edge_threshold: Any) -> None:
    """Refuse pruning thresholds that are not numbers in [0, 1]."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise AttributionError(f"{name} must be a number in [0, 1], got {value!r}")


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Keep the nodes holding `node_threshold` of the influence on the logits and the
    edges holding `edge_threshold` of the edge influence (module docstring); token and
    logit nodes always stay. The pruned graph keeps the kept features (in their order)
    and every error, token and logit node, with the adjacency zero outside kept edges;
    its metadata records the thresholds."""
    check_thresholds(node_threshold, edge_threshold)
    n_features, first_token = graph.n_features, graph.token_node(0)
    adjacency = graph.adjacency.to(_dtype(graph))
    weights = logit_node_weights(graph)

    influence = path_influence(normalized_adjacency(adjacency), weights)
    node_mask = keep_top(influence, node_threshold)
    node_mask[first_token:] = True

    kept = node_mask[:, None] & node_mask[None, :]
    pruned = normalized_adjacency(adjacency * kept)
    edge_scores = pruned * (path_influence(pruned, weights) + weights)[:, None]
    edge_mask = keep_top(edge_scores.flatten(), edge_threshold).view_as(edge_scores) & (edge_scores > 0)

    while True:
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        new_mask = node_mask.clone()
        new_mask[:first_token] &= edge_mask[:, :first_token].any(dim=0)  # an outgoing edge
        new_mask[:n_features] &= edge_mask[:n_features].any(dim=1)  # an incoming edge
        if torch.equal(new_mask, node_mask):
            break
        node_mask = new_mask

    kept_features = node_mask[:n_features]
    other_nodes = torch.arange(n_features, graph.n_nodes, device=node_mask.device)
    rows = torch.cat([kept_features.nonzero().flatten(), other_nodes])
    pruned_graph = Graph(
        tokens=graph.tokens,
        features=graph.features[kept_features],
        activations=graph.activations[kept_features],
        n_layers=graph.n_layers,
        logit_tokens=graph.logit_tokens,
        logit_probabilities=graph.logit_probabilities,
        adjacency=(graph.adjacency * edge_mask)[rows][:, rows],
        prompt=graph.prompt,
        model_name=graph.model_name,
        metadata={
            **graph.metadata,
            "pruning": {"node_threshold": node_threshold, "edge_threshold": edge_threshold},
        },
    )
    return PruneResult(node_mask, edge_mask, cumulative_share(influence), pruned_graph)


def graph_scores(graph: Graph) -> GraphScores:
    """The replacement and completeness scores of an (unpruned) graph (circuit-tracer's
    definitions): replacement = token influence / (token + error influence); completeness
    = sum over nodes of (1 - share of the node's normalised inputs from error nodes) x
    (its influence + its logit weight), divided by the sum of those weights."""
    normalized = normalized_adjacency(graph.adjacency.to(_dtype(graph)))
    weights = logit_node_weights(graph)
    influence = path_influence(normalized, weights)
    errors = slice(graph.error_node(0, 0), graph.token_node(0))
    tokens = slice(graph.token_node(0), graph.logit_node(0))
    token_influence, error_influence = influence[tokens].sum(), influence[errors].sum()
    replacement = token_influence / (token_influence + error_influence)
    output_weight = influence + weights
    non_error_share = 1 - normalized[:, errors].sum(dim=1)
    completeness = (non_error_share * output_weight).sum() / output_weight.sum()
    return GraphScores(float(replacement), float(completeness))


def _sorted_shares(scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`scores` sorted in descending order, the sorting order, and the running share of the total."""
    ordered, order = scores.sort(descending=True)
    return ordered, order, ordered.cumsum(0) / ordered.sum().clamp(min=torch.finfo(ordered.dtype).tiny)


def _dtype(graph: Graph) -> torch.dtype:
    """The adjacency's dtype, at least float32 (influence sums many small products)."""
    return torch.promote_types(graph.adjacency.dtype, torch.float32)
