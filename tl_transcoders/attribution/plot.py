"""`plot_graph`: an interactive plotly figure of an attribution `Graph` for notebooks.

Rows are layers (token embeddings at the bottom, each layer's features and error node
above, logits at the top), columns are positions; nodes sharing a (row, position) cell
are spread across it. Edges are line segments, blue for positive and red for negative
weights, wider for larger |weight|. plotly is an optional dependency
(`pip install 'tl-transcoders[plot]'`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from tl_transcoders.attribution.errors import AttributionError
from tl_transcoders.attribution.graph import Graph, token_labels
from tl_transcoders.attribution.prune import node_influence
from tl_transcoders.core.errors import check_at_least

__all__ = ["EDGE_COLORS", "NODE_STYLES", "plot_graph"]

if TYPE_CHECKING:
    import plotly.graph_objects as go

EDGE_COLORS = {True: "rgba(31, 119, 180, 0.6)", False: "rgba(214, 39, 40, 0.6)"}  # positive, negative
NODE_STYLES = {  # kind: (legend name, marker symbol, colour, size)
    "feature": ("features", "circle", "#2ca02c", 9),
    "error": ("errors", "diamond", "#7f7f7f", 9),
    "token": ("tokens", "square", "#9467bd", 11),
    "logit": ("logits", "square", "#ff7f0e", 11),
}


def plot_graph(
    graph: Graph,
    *,
    tokenizer: Any | None = None,
    token_strings: list[str] | None = None,
    edge_widths: int = 4,
    title: str | None = None,
) -> go.Figure:
    """A plotly `Figure` of `graph` (prune it first: `prune(graph).graph`, a full graph
    has thousands of edges). Draws every feature, token and logit node, each error node
    with an edge, and one segment per nonzero adjacency entry, the width of |weight| /
    max |weight| rounded up to one of `edge_widths` levels. Token strings label the
    positions: `token_strings`, or the tokens decoded by `tokenizer`, else the ids."""
    try:
        import plotly.graph_objects as go
    except ImportError as err:
        raise ImportError("plot_graph needs plotly: pip install 'tl-transcoders[plot]'") from err
    if token_strings is not None and len(token_strings) != graph.n_pos:
        raise AttributionError(f"token_strings has {len(token_strings)} entries, the graph has {graph.n_pos} positions")
    check_at_least(AttributionError, 1, edge_widths=edge_widths)
    labels = token_strings if token_strings is not None else token_labels(graph.tokens, tokenizer)
    logit_labels = graph.target_labels(tokenizer)
    adjacency = graph.adjacency.detach().cpu()
    influence = node_influence(graph).cpu()
    has_edge = (adjacency != 0).any(dim=0) | (adjacency != 0).any(dim=1)

    nodes = [(index, *_place(graph, index)) for index in range(graph.n_nodes)]
    nodes = [node for node in nodes if node[1] != "error" or has_edge[node[0]]]
    xy = _layout([(row, pos) for _, _, row, pos in nodes])
    position = {index: xy[i] for i, (index, *_) in enumerate(nodes)}

    figure = go.Figure()
    targets, sources = adjacency.nonzero(as_tuple=True)
    weights = adjacency[targets, sources]
    if len(weights):
        levels = (weights.abs() / weights.abs().max() * edge_widths).ceil().clamp(1, edge_widths).long()
        segments: dict[tuple[bool, int], tuple[list, list]] = defaultdict(lambda: ([], []))
        edges = zip(targets.tolist(), sources.tolist(), weights.tolist(), levels.tolist())
        for target, source, weight, level in edges:
            xs, ys = segments[(weight > 0, level)]
            xs += [position[source][0], position[target][0], None]
            ys += [position[source][1], position[target][1], None]
        in_legend: set[bool] = set()
        for (positive, level), (xs, ys) in sorted(segments.items()):
            figure.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines",
                    line=dict(color=EDGE_COLORS[positive], width=0.5 + 3.5 * level / edge_widths),
                    hoverinfo="skip",
                    name="positive edges" if positive else "negative edges",
                    legendgroup="positive" if positive else "negative",
                    showlegend=positive not in in_legend,
                )
            )
            in_legend.add(positive)

    for kind, (name, symbol, color, size) in NODE_STYLES.items():
        members = [(index, row, pos) for index, k, row, pos in nodes if k == kind]
        if not members:
            continue
        figure.add_trace(
            go.Scatter(
                x=[position[index][0] for index, _, _ in members],
                y=[position[index][1] for index, _, _ in members],
                mode="markers",
                marker=dict(symbol=symbol, color=color, size=size, line=dict(width=1, color="white")),
                name=name,
                hovertext=[
                    _hover(graph, index, kind, pos, labels, logit_labels, float(influence[index]))
                    for index, _, pos in members
                ],
                hoverinfo="text",
            )
        )

    figure.update_layout(
        title=title or graph.prompt,
        xaxis=dict(tickmode="array", tickvals=list(range(graph.n_pos)), ticktext=labels, title="position"),
        yaxis=dict(
            tickmode="array",
            tickvals=list(range(graph.n_layers + 2)),
            ticktext=["embed"] + [f"L{layer}" for layer in range(graph.n_layers)] + ["logits"],
            title="layer",
        ),
        plot_bgcolor="white",
        hovermode="closest",
    )
    return figure


def _place(graph: Graph, index: int) -> tuple[str, int, int]:
    """(kind, row, position) of node `index`: row 0 holds tokens, row layer + 1 a layer's
    features and errors, row n_layers + 1 the targets (logits at the last position)."""
    if index < graph.error_node(0, 0):
        layer, pos, _ = graph.features[index].tolist()
        return "feature", layer + 1, pos
    if index < graph.token_node(0):
        layer, pos = divmod(index - graph.error_node(0, 0), graph.n_pos)
        return "error", layer + 1, pos
    if index < graph.logit_node(0):
        return "token", 0, index - graph.token_node(0)
    return "logit", graph.n_layers + 1, graph.target_positions()[index - graph.logit_node(0)]


def _layout(cells: list[tuple[int, int]]) -> list[tuple[float, float]]:
    """Plot coordinates for nodes in (row, position) `cells`: the nodes of one cell spread
    evenly over [position - 0.35, position + 0.35] in the order given."""
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for cell in cells:
        counts[cell] += 1
    seen: dict[tuple[int, int], int] = defaultdict(int)
    coordinates = []
    for row, pos in cells:
        n, i = counts[(row, pos)], seen[(row, pos)]
        seen[(row, pos)] += 1
        offset = 0.0 if n == 1 else -0.35 + 0.7 * i / (n - 1)
        coordinates.append((pos + offset, float(row)))
    return coordinates


def _hover(
    graph: Graph, index: int, kind: str, pos: int, labels: list[str], logit_labels: list[str], influence: float
) -> str:
    """The hover text of a node."""
    where = f"pos {pos} {labels[pos]!r}"
    if kind == "feature":
        layer, _, latent = graph.features[index].tolist()
        text = f"feature L{layer} #{latent}<br>{where}<br>activation {float(graph.activations[index]):.4g}"
    elif kind == "error":
        text = f"error L{(index - graph.error_node(0, 0)) // graph.n_pos}<br>{where}"
    elif kind == "token":
        text = f"token {int(graph.tokens[pos])}<br>{where}"
    else:
        rank = index - graph.logit_node(0)
        probability = float(graph.logit_probabilities[rank])
        if "targets" in graph.metadata:
            return f"target {logit_labels[rank]}<br>weight {probability:.3f}"
        return f"logit {logit_labels[rank]!r} (id {int(graph.logit_tokens[rank])})<br>p = {probability:.3f}"
    return f"{text}<br>influence {influence:.4g}"
