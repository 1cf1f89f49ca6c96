"""Export a pruned attribution `Graph` as a circuit-tracer graph file, the JSON that its
local viewer (`circuit_tracer.frontend.local_server.serve`) and Neuronpedia read.

The file holds `metadata` (slug, scan, transcoder_list, prompt_tokens, prompt,
node_threshold, schema_version), `qParams` (the viewer's saved state), `nodes` and
`links` (`source`, `target`, `weight`, with node ids as below). Node ids follow
circuit-tracer: feature `{layer}_{latent}_{pos}`, error `{layer}_-1_{pos}`, token
`E_{token_id}_{pos}`, logit `{n_layers + 1}_{token_id}_{last_pos}`. A node's
`influence` is its cumulative influence share (`PruneResult.cumulative_influence`).
`export_graph` also adds the graph to `graph-metadata.json`, the viewer's index of the
graphs in a directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from tl_transcoders.attribution.errors import AttributionError
from tl_transcoders.attribution.graph import Graph, token_labels
from tl_transcoders.attribution.prune import prune
from tl_transcoders.core.files import atomic_write, check_writable_directory, read_mapping

__all__ = [
    "FEATURE_TYPES",
    "INDEX_FILE",
    "NODE_FIELDS",
    "check_slug",
    "export_graph",
    "graph_json",
    "read_index",
]

INDEX_FILE = "graph-metadata.json"
NODE_FIELDS = (
    "node_id",
    "feature",
    "layer",
    "ctx_idx",
    "feature_type",
    "token_prob",
    "is_target_logit",
    "run_idx",
    "reverse_ctx_idx",
    "jsNodeId",
    "clerp",
    "influence",
    "activation",
)
FEATURE_TYPES = {
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "token": "embedding",
    "logit": "logit",
}


def graph_json(
    graph: Graph,
    slug: str,
    *,
    tokenizer: Any | None = None,
    scan: str | list[str] | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    clerps: dict[tuple[int, int], str] | None = None,
) -> dict:
    """The circuit-tracer graph file of `graph` pruned at the thresholds, as a dict. Pass
    the unpruned graph (as to circuit-tracer's `create_graph_files`): node influences are
    cumulative shares of the whole graph's influence.

    `tokenizer` (anything with `decode(list[int])`) labels tokens and logits; `scan`
    names the transcoder set (a list of transcoder names gives a "custom-..." scan as in
    circuit-tracer; default: `metadata["scan"]`, else the model name); `clerps` maps
    (layer, latent) to a feature's label."""
    result = prune(graph, node_threshold, edge_threshold)
    prompt_tokens = token_labels(graph.tokens, tokenizer)
    logit_labels = graph.target_labels(tokenizer)
    clerps = clerps or {}
    influence = result.cumulative_influence.tolist()

    ids: dict[int, str] = {}
    nodes = []
    for index in result.node_mask.nonzero().flatten().tolist():
        node = _node(graph, index, influence[index], logit_labels, clerps)
        ids[index] = node["node_id"]
        nodes.append(node)
    targets, sources = result.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources].tolist()
    links = [
        {"source": ids[source], "target": ids[target], "weight": weight}
        for target, source, weight in zip(targets.tolist(), sources.tolist(), weights)
    ]

    transcoder_list: list[str] = []
    if scan is None:
        scan = graph.metadata.get("scan") or graph.model_name or "tl-transcoders"
    elif isinstance(scan, list):
        transcoder_list = list(scan)
        scan = "custom-" + hashlib.sha256("-".join(scan).encode()).hexdigest()[:16]
    metadata = {
        "slug": slug,
        "scan": scan,
        "transcoder_list": transcoder_list,
        "prompt_tokens": prompt_tokens,
        "prompt": graph.prompt if graph.prompt is not None else "".join(prompt_tokens),
        "node_threshold": node_threshold,
        "schema_version": 1,
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}


def check_slug(slug: Any) -> None:
    """Refuse a graph slug that is not a plain file name."""
    if not isinstance(slug, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}", slug):
        raise AttributionError(f"slug {slug!r} must be a file name of at most 200 letters, digits, '_', '.' and '-'")


def export_graph(graph: Graph, output_dir: str | os.PathLike, slug: str, **options: Any) -> Path:
    """Write `graph_json(graph, slug, **options)` (`options`: its `tokenizer`, `scan`,
    thresholds and `clerps`) to `output_dir/{slug}.json` and list it in
    `output_dir/graph-metadata.json` (replacing an entry of the same slug); returns the
    graph file's path. Serve the directory with circuit-tracer's viewer to browse it."""
    check_slug(slug)
    output_dir = check_writable_directory(output_dir)
    index_path = output_dir / INDEX_FILE
    index = read_index(index_path) if index_path.is_file() else {"graphs": []}  # refused before anything is written
    data = graph_json(graph, slug, **options)
    path = output_dir / f"{slug}.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data)))
    index["graphs"] = [entry for entry in index["graphs"] if entry.get("slug") != slug] + [data["metadata"]]
    atomic_write(index_path, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
    return path


def read_index(path: Path) -> dict:
    """The `{"graphs": [metadata, ...]}` index of a graph directory."""
    try:
        index = read_mapping(path, AttributionError)
    except AttributionError:
        index = None
    if (
        index is None
        or not isinstance(index.get("graphs"), list)
        or not all(isinstance(entry, dict) for entry in index["graphs"])
    ):
        raise AttributionError(
            f'{path}: not a graph index ({{"graphs": [...]}}); move it away or pick another directory'
        )
    return index


def _node(graph: Graph, index: int, influence: float, logit_labels: list[str], clerps: dict) -> dict:
    """The graph-file record of node `index` of `graph`."""
    first_error, first_token, first_logit = graph.error_node(0, 0), graph.token_node(0), graph.logit_node(0)
    node: dict[str, Any] = {
        "token_prob": 0.0,
        "is_target_logit": False,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "clerp": "",
        "influence": influence,
        "activation": None,
    }
    if index < first_error:
        layer, pos, latent = graph.features[index].tolist()
        node.update(
            node_id=f"{layer}_{latent}_{pos}",
            feature=(layer + latent) * (layer + latent + 1) // 2 + latent,  # Cantor pairing, as circuit-tracer
            layer=str(layer),
            ctx_idx=pos,
            feature_type=FEATURE_TYPES["feature"],
            jsNodeId=f"{layer}_{latent}-0",
            clerp=clerps.get((layer, latent), ""),
            activation=float(graph.activations[index]),
        )
    elif index < first_token:
        layer, pos = divmod(index - first_error, graph.n_pos)
        node.update(
            node_id=f"{layer}_-1_{pos}",
            feature=-1,
            layer=str(layer),
            ctx_idx=pos,
            feature_type=FEATURE_TYPES["error"],
            jsNodeId=f"{layer}_-1-{pos}",
        )
    elif index < first_logit:
        pos = index - first_token
        token = int(graph.tokens[pos])
        node.update(
            node_id=f"E_{token}_{pos}",
            feature=pos,
            layer="E",
            ctx_idx=pos,
            feature_type=FEATURE_TYPES["token"],
            jsNodeId=f"E_{token}-{pos}",
        )
    else:
        rank = index - first_logit
        token, probability = int(graph.logit_tokens[rank]), float(graph.logit_probabilities[rank])
        layer, pos = str(graph.n_layers + 1), graph.target_positions()[rank]
        node.update(
            node_id=f"{layer}_{token}_{pos}",
            feature=token,
            layer=layer,
            ctx_idx=pos,
            feature_type=FEATURE_TYPES["logit"],
            jsNodeId=f"L_{token}-{pos}",
            token_prob=probability,
            is_target_logit=rank == 0,
            clerp=(
                f'Output "{logit_labels[rank]}" (p={probability:.3f})'
                if "targets" not in graph.metadata
                else f"Target: {logit_labels[rank]} (weight {probability:.3f})"
            ),
            influence=None,
        )
    return {key: node[key] for key in NODE_FIELDS}
