"""Attribution graphs after attribution: influence, pruning, scores, files, export, plot."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from tl_transcoders.attribution.export import export_graph, graph_json
from tl_transcoders.attribution.graph import Graph, GraphFileError
from tl_transcoders.attribution.plot import plot_graph
from tl_transcoders.attribution.prune import (
    graph_scores,
    keep_top,
    logit_node_weights,
    node_influence,
    normalized_adjacency,
    path_influence,
    prune,
)


class FakeTokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join("\n" if i == 0 else f"t{i}" for i in ids)


def random_graph(
    seed: int = 0, n_layers: int = 3, n_pos: int = 5, n_logits: int = 4, dtype=torch.float64, density=0.6
) -> Graph:
    """A random graph with the structure of a real one: features at positions >= 1, each fed
    by earlier-layer features and errors and by tokens at its own or earlier positions;
    logits fed by every feature, error and token; errors and tokens have no inputs."""
    generator = torch.Generator().manual_seed(seed)
    features = []
    for layer in range(n_layers):
        for pos in range(1, n_pos):
            count = int(torch.randint(0, 4, (1,), generator=generator))
            latents = torch.randperm(50, generator=generator)[:count].sort().values.tolist()
            features += [(layer, pos, latent) for latent in latents]
    graph = Graph(
        tokens=torch.randint(0, 50, (n_pos,), generator=generator),
        features=torch.tensor(features, dtype=torch.long).reshape(-1, 3),
        activations=torch.rand(len(features), generator=generator, dtype=dtype) + 0.1,
        n_layers=n_layers,
        logit_tokens=torch.randperm(50, generator=generator)[:n_logits],
        logit_probabilities=torch.softmax(torch.randn(n_logits, generator=generator, dtype=dtype), 0) * 0.9,
        adjacency=torch.zeros(0, 0, dtype=dtype),
        prompt="a random prompt",
        model_name="random",
        metadata={"sites": ["blocks.0.hook_mlp_out"], "options": {"max_feature_nodes": 64}},
    )
    n = graph.n_nodes
    layer, pos = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    layer[: graph.n_features], pos[: graph.n_features] = graph.features[:, 0], graph.features[:, 1]
    errors = torch.arange(n_layers * n_pos)
    layer[graph.error_node(0, 0) : graph.token_node(0)] = errors // n_pos
    pos[graph.error_node(0, 0) : graph.token_node(0)] = errors % n_pos
    tokens = slice(graph.token_node(0), graph.logit_node(0))
    layer[tokens], pos[tokens] = -1, torch.arange(n_pos)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    is_source = torch.arange(n) < graph.logit_node(0)
    allowed[: graph.n_features] = (
        (layer[None, :] < layer[: graph.n_features, None]) & (pos[None, :] <= pos[: graph.n_features, None]) & is_source
    )
    allowed[graph.logit_node(0) :] = is_source
    weights = torch.randn(n, n, generator=generator, dtype=dtype)
    weights *= torch.rand(n, n, generator=generator, dtype=dtype) < density
    graph.adjacency = weights * allowed
    graph.validate()
    return graph


def explicit_influence(graph: Graph) -> np.ndarray:
    """w @ (N + N^2 + ... + N^n) with every power written out, in numpy."""
    matrix = np.abs(graph.adjacency.numpy())
    sums = matrix.sum(axis=1, keepdims=True)
    normalized = np.divide(matrix, sums, out=np.zeros_like(matrix), where=sums > 0)
    weights = np.zeros(graph.n_nodes)
    weights[graph.logit_node(0) :] = graph.logit_probabilities.numpy()
    total = np.zeros_like(normalized)
    for power in range(1, graph.n_nodes + 1):
        total += np.linalg.matrix_power(normalized, power)
    return weights @ total


def reference_prune(graph: Graph, node_threshold: float, edge_threshold: float) -> tuple[np.ndarray, ...]:
    """Node and edge masks from the circuit-tracer pruning rules, written with a linear
    solve for the influence and Python loops for the thresholds."""
    n, n_features, first_token = graph.n_nodes, graph.n_features, graph.token_node(0)
    weights = np.zeros(n)
    weights[graph.logit_node(0) :] = graph.logit_probabilities.numpy()

    def normalize(matrix):
        matrix = np.abs(matrix)
        sums = matrix.sum(axis=1, keepdims=True)
        return np.divide(matrix, sums, out=np.zeros_like(matrix), where=sums > 0)

    def influence(normalized):  # w @ ((I - N)^-1 - I)
        return weights @ (np.linalg.inv(np.eye(n) - normalized) - np.eye(n))

    def smallest_kept(scores, threshold):  # the smallest score of the top set holding `threshold`
        ordered, running = sorted(scores, reverse=True), 0.0
        for score in ordered:
            running += score
            if running >= threshold * sum(ordered):
                return score
        return ordered[-1]

    adjacency = graph.adjacency.numpy()
    nodes = influence(normalize(adjacency))
    node_mask = nodes >= smallest_kept(list(nodes), node_threshold)
    node_mask[first_token:] = True
    pruned = normalize(adjacency * np.outer(node_mask, node_mask))
    scores = pruned * (influence(pruned) + weights)[:, None]
    edge_mask = (scores >= smallest_kept(list(scores.flatten()), edge_threshold)) & (scores > 0)
    changed = True
    while changed:
        edge_mask &= np.outer(node_mask, node_mask)
        before = node_mask.copy()
        for i in range(first_token):
            node_mask[i] &= edge_mask[:, i].any() and (i >= n_features or edge_mask[i].any())
        changed = (before != node_mask).any()
    return node_mask, edge_mask


# --- influence -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_influence_is_the_sum_of_matrix_powers(seed):
    graph = random_graph(seed)
    np.testing.assert_allclose(node_influence(graph).numpy(), explicit_influence(graph), rtol=1e-10, atol=1e-12)


def test_normalized_rows_sum_to_one_or_zero():
    graph = random_graph(3)
    sums = normalized_adjacency(graph.adjacency).sum(dim=1)
    has_input = (graph.adjacency != 0).any(dim=1)
    torch.testing.assert_close(sums[has_input], torch.ones_like(sums[has_input]))
    assert (sums[~has_input] == 0).all()
    assert (logit_node_weights(graph)[graph.logit_node(0) :] == graph.logit_probabilities).all()


def test_influence_on_a_cycle_raises():
    cycle = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="cycle"):
        path_influence(cycle, torch.tensor([1.0, 0.0]))


# --- pruning ---------------------------------------------------------------------------------


def test_keep_top_keeps_the_smallest_top_set_reaching_the_threshold():
    scores = torch.tensor([1.0, 8.0, 2.0, 4.0, 1.0])
    # sorted: 8, 4, 2, 1, 1 -> running shares 0.5, 0.75, 0.875, 0.9375, 1 (exact in binary)
    everything = {0, 1, 2, 3, 4}
    cases = [(0.0, {1}), (0.5, {1}), (0.75, {1, 3}), (0.76, {1, 2, 3}), (0.9, everything), (1.0, everything)]
    for threshold, kept in cases:  # ties with the last kept score are kept too
        assert set(keep_top(scores, threshold).nonzero().flatten().tolist()) == kept


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (0.5, 0.9), (1.0, 1.0)])
def test_prune_matches_the_reference_rules(seed, thresholds):
    graph = random_graph(seed)
    result = prune(graph, *thresholds)
    node_mask, edge_mask = reference_prune(graph, *thresholds)
    assert np.array_equal(result.node_mask.numpy(), node_mask)
    assert np.array_equal(result.edge_mask.numpy(), edge_mask)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_prune_keeps_tokens_logits_and_a_connected_graph(seed):
    graph = random_graph(seed)
    node_mask, edge_mask, _, _ = prune(graph)
    first_token = graph.token_node(0)
    assert node_mask[first_token:].all()
    # kept feature and error nodes are among the top nodes holding 80% of the influence
    assert not (node_mask & ~keep_top(node_influence(graph), 0.8))[:first_token].any()
    assert not edge_mask[~node_mask].any() and not edge_mask[:, ~node_mask].any()
    assert edge_mask[:, :first_token].any(dim=0)[node_mask[:first_token]].all()
    assert edge_mask[: graph.n_features].any(dim=1)[node_mask[: graph.n_features]].all()
    assert (graph.adjacency[edge_mask] != 0).all()


def test_cumulative_influence_is_the_running_share():
    graph = random_graph(4)
    influence = node_influence(graph)
    cumulative = prune(graph).cumulative_influence
    for i in range(graph.n_nodes):
        expected = influence[influence >= influence[i]].sum() / influence.sum()
        if (influence == influence[i]).sum() == 1:  # ties share a running total in some order
            torch.testing.assert_close(cumulative[i], expected)


def test_pruned_graph_holds_the_kept_nodes_and_edges():
    graph = random_graph(5)
    node_mask, edge_mask, _, pruned = prune(graph, 0.7, 0.95)
    kept = node_mask[: graph.n_features]
    assert torch.equal(pruned.features, graph.features[kept])
    assert torch.equal(pruned.activations, graph.activations[kept])
    assert pruned.n_layers == graph.n_layers and torch.equal(pruned.tokens, graph.tokens)
    assert torch.equal(pruned.logit_tokens, graph.logit_tokens)
    pruned.validate()
    index = torch.cat([kept.nonzero().flatten(), torch.arange(graph.n_features, graph.n_nodes)])
    for new_target, old_target in enumerate(index.tolist()):
        for new_source, old_source in enumerate(index.tolist()):
            expected = graph.adjacency[old_target, old_source] if edge_mask[old_target, old_source] else 0.0
            assert pruned.adjacency[new_target, new_source] == expected
    assert int((pruned.adjacency != 0).sum()) == int(edge_mask.sum())
    assert pruned.metadata["pruning"] == {"node_threshold": 0.7, "edge_threshold": 0.95}
    assert pruned.metadata["sites"] == graph.metadata["sites"]


def test_prune_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="node_threshold"):
        prune(random_graph(), node_threshold=1.5)
    with pytest.raises(ValueError, match="edge_threshold"):
        prune(random_graph(), edge_threshold=-0.1)


# --- scores ----------------------------------------------------------------------------------


def tiny_graph(b: float, c: float, d: float, a: float = 1.5) -> Graph:
    """One layer, one position, one feature, one logit (p = 1): feature <- token (a);
    logit <- feature (b), error (c), token (d). Nodes: feature, error, token, logit."""
    adjacency = torch.zeros(4, 4, dtype=torch.float64)
    adjacency[0, 2] = a
    adjacency[3, 0], adjacency[3, 1], adjacency[3, 2] = b, c, d
    return Graph(
        tokens=torch.tensor([7]),
        features=torch.tensor([[0, 0, 3]]),
        activations=torch.tensor([1.0], dtype=torch.float64),
        n_layers=1,
        logit_tokens=torch.tensor([9]),
        logit_probabilities=torch.tensor([1.0], dtype=torch.float64),
        adjacency=adjacency,
    )


@pytest.mark.parametrize("b, c, d", [(2.0, -1.0, 1.0), (0.5, 3.0, -2.0), (0.0, 1.0, 0.0), (1.0, 0.0, -1.0)])
def test_scores_equal_the_hand_derived_values(b, c, d):
    # N's logit row is (|b|, |c|, |d|) / S, S = |b| + |c| + |d|; the feature row is (token: 1).
    # Influence: feature |b|/S, error |c|/S, token (|b| + |d|)/S  ->  replacement (|b| + |d|)/S.
    # Completeness: non-error shares are 1 for the feature, error and token rows, 1 - |c|/S for
    # the logit row; the weights are the influences and the logit's 1:
    # (1 + (2|b| + |d|)/S) / (2 + |b|/S).
    b_, c_, d_ = abs(b), abs(c), abs(d)
    s = b_ + c_ + d_
    replacement, completeness = graph_scores(tiny_graph(b, c, d))
    assert replacement == pytest.approx((b_ + d_) / s)
    assert completeness == pytest.approx((1 + (2 * b_ + d_) / s) / (2 + b_ / s))


def test_all_influence_through_errors_gives_replacement_zero():
    graph = random_graph(6)
    graph.adjacency[graph.logit_node(0) :, : graph.error_node(0, 0)] = 0  # logits see no features
    graph.adjacency[graph.logit_node(0) :, graph.token_node(0) : graph.logit_node(0)] = 0  # ... nor tokens
    assert graph_scores(graph).replacement == 0.0
    graph.adjacency[:, graph.error_node(0, 0) : graph.token_node(0)] = 0  # now no errors at all
    graph.adjacency[graph.logit_node(0) :, : graph.error_node(0, 0)] = 1.0
    assert graph_scores(graph) == pytest.approx((1.0, 1.0))


# --- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    graph = random_graph(7, dtype=dtype)
    graph.metadata["note"] = {"nested": [1, 2.5, None, "x"], "flag": True}
    loaded = Graph.load(graph.save(tmp_path / "graph.safetensors"))
    for name in ("tokens", "features", "activations", "logit_tokens", "logit_probabilities", "adjacency"):
        original, restored = getattr(graph, name), getattr(loaded, name)
        assert restored.dtype == original.dtype and torch.equal(restored, original), name
    for name in ("n_layers", "prompt", "model_name"):
        assert getattr(loaded, name) == getattr(graph, name)
    assert loaded.metadata == graph.metadata
    assert [p.name for p in tmp_path.iterdir()] == ["graph.safetensors"]  # no temporary file left


def test_save_load_without_features(tmp_path):
    graph = tiny_graph(1.0, 1.0, 1.0)
    empty = Graph(
        tokens=graph.tokens,
        features=torch.zeros(0, 3, dtype=torch.long),
        activations=torch.zeros(0, dtype=torch.float64),
        n_layers=1,
        logit_tokens=graph.logit_tokens,
        logit_probabilities=graph.logit_probabilities,
        adjacency=graph.adjacency[1:, 1:],
    )
    loaded = Graph.load(empty.save(tmp_path / "g.safetensors"))
    assert loaded.n_features == 0 and torch.equal(loaded.adjacency, empty.adjacency)


def test_load_reports_corrupt_and_foreign_files(tmp_path):
    path = random_graph().save(tmp_path / "graph.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(GraphFileError, match="truncated or corrupt"):
        Graph.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a file at all")
    with pytest.raises(GraphFileError, match="truncated or corrupt"):
        Graph.load(garbage)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"W_enc": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(GraphFileError, match="not a tl-transcoders graph"):
        Graph.load(foreign)
    with pytest.raises(GraphFileError, match="no such file"):
        Graph.load(tmp_path / "missing.safetensors")


def test_load_reports_inconsistent_fields(tmp_path):
    graph = random_graph()
    graph.adjacency = graph.adjacency[:-1, :-1]
    with pytest.raises(GraphFileError, match="adjacency has shape"):
        Graph.load(graph.save(tmp_path / "graph.safetensors"))


def test_save_rejects_metadata_that_is_not_json(tmp_path):
    graph = random_graph()
    graph.metadata["tensor"] = torch.zeros(2)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        graph.save(tmp_path / "graph.safetensors")
    assert not any(tmp_path.iterdir())


# --- export ----------------------------------------------------------------------------------


def node_index(graph: Graph) -> dict[str, int]:
    """circuit-tracer node id -> node index in `graph`, built from the id conventions."""
    ids = {f"{layer}_{latent}_{pos}": i for i, (layer, pos, latent) in enumerate(graph.features.tolist())}
    for layer in range(graph.n_layers):
        for pos in range(graph.n_pos):
            ids[f"{layer}_-1_{pos}"] = graph.error_node(layer, pos)
    for pos, token in enumerate(graph.tokens.tolist()):
        ids[f"E_{token}_{pos}"] = graph.token_node(pos)
    for rank, token in enumerate(graph.logit_tokens.tolist()):
        ids[f"{graph.n_layers + 1}_{token}_{graph.n_pos - 1}"] = graph.logit_node(rank)
    return ids


@pytest.mark.parametrize("seed", [0, 1])
def test_export_matches_the_pruned_graph(tmp_path, seed):
    graph = random_graph(seed)
    pruned = prune(graph).graph
    path = export_graph(graph, tmp_path, "my-graph", tokenizer=FakeTokenizer(), clerps={(0, 3): "a label"})
    data = json.loads(path.read_text())

    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    assert data["metadata"]["slug"] == "my-graph" and data["metadata"]["node_threshold"] == 0.8
    assert data["metadata"]["prompt_tokens"] == [f"t{t}" if t else "⏎" for t in graph.tokens.tolist()]
    types = [node["feature_type"] for node in data["nodes"]]
    kept_errors = (pruned.adjacency[:, pruned.error_node(0, 0) : pruned.token_node(0)] != 0).any(dim=0)
    assert types.count("cross layer transcoder") == pruned.n_features
    assert types.count("mlp reconstruction error") == int(kept_errors.sum())
    assert types.count("embedding") == graph.n_pos and types.count("logit") == graph.n_logits
    assert len({node["node_id"] for node in data["nodes"]}) == len(data["nodes"])

    ids = node_index(pruned)
    assert len(data["links"]) == int((pruned.adjacency != 0).sum())
    for link in data["links"]:
        assert link["weight"] == pruned.adjacency[ids[link["target"]], ids[link["source"]]].item()

    logits = [node for node in data["nodes"] if node["feature_type"] == "logit"]
    assert [node["is_target_logit"] for node in logits] == [True] + [False] * (graph.n_logits - 1)
    assert logits[0]["token_prob"] == graph.logit_probabilities[0].item()
    assert logits[0]["clerp"].startswith(f'Output "t{graph.logit_tokens[0].item()}" (p=')
    for node in data["nodes"]:
        if node["feature_type"] == "cross layer transcoder":
            i = ids[node["node_id"]]
            layer, pos, latent = pruned.features[i].tolist()
            assert (node["layer"], node["ctx_idx"]) == (str(layer), pos)
            assert node["activation"] == pruned.activations[i].item()
            assert node["clerp"] == ("a label" if (layer, latent) == (0, 3) else "")
            assert 0 < node["influence"] <= 1

    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert index == {"graphs": [data["metadata"]]}
    export_graph(graph, tmp_path, "my-graph", scan=["tc0", "tc1"])
    export_graph(graph, tmp_path, "other")
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [entry["slug"] for entry in index["graphs"]] == ["my-graph", "other"]
    assert index["graphs"][0]["transcoder_list"] == ["tc0", "tc1"]
    assert index["graphs"][0]["scan"].startswith("custom-")


def test_export_rejects_bad_slugs_and_indexes(tmp_path):
    with pytest.raises(ValueError, match="slug"):
        export_graph(random_graph(), tmp_path, "../escape")
    (tmp_path / "graph-metadata.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a graph index"):
        export_graph(random_graph(), tmp_path, "ok")


def test_graph_json_thresholds_are_used():
    graph = random_graph(2)
    loose = graph_json(graph, "g", node_threshold=1.0, edge_threshold=1.0)
    strict = graph_json(graph, "g", node_threshold=0.3)
    assert len(strict["nodes"]) < len(loose["nodes"]) and len(strict["links"]) < len(loose["links"])


# --- plot ------------------------------------------------------------------------------------


def test_plot_draws_every_kept_node_and_edge():
    pytest.importorskip("plotly")
    graph = prune(random_graph(3)).graph
    strings = [f"tok{i}" for i in range(graph.n_pos)]
    figure = plot_graph(graph, token_strings=strings)
    lines = [trace for trace in figure.data if trace.mode == "lines"]
    segments = sum(list(trace.x).count(None) for trace in lines)
    assert segments == int((graph.adjacency != 0).sum())
    signs = {trace.name: trace for trace in lines}
    assert set(signs) <= {"positive edges", "negative edges"}
    markers = {trace.name: trace for trace in figure.data if trace.mode == "markers"}
    kept_errors = int(
        ((graph.adjacency != 0).any(0) | (graph.adjacency != 0).any(1))[
            graph.error_node(0, 0) : graph.token_node(0)
        ].sum()
    )
    assert len(markers["features"].x) == graph.n_features
    assert len(markers["errors"].x) == kept_errors
    assert len(markers["tokens"].x) == graph.n_pos and len(markers["logits"].x) == graph.n_logits
    assert list(figure.layout.xaxis.ticktext) == strings
    assert min(markers["tokens"].y) == 0 and max(markers["logits"].y) == graph.n_layers + 1
    # each edge segment starts at its source node and ends at its target node
    coordinates = {(x, y) for trace in markers.values() for x, y in zip(trace.x, trace.y)}
    for trace in lines:
        points = [(x, y) for x, y in zip(trace.x, trace.y) if x is not None]
        assert set(points) <= coordinates


def test_plot_without_plotly_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly", None)
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    with pytest.raises(ImportError, match=r"pip install 'tl-transcoders\[plot\]'"):
        plot_graph(random_graph())
