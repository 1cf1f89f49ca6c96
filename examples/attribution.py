"""Circuit attribution on a tiny random model: runs offline in seconds.

    python examples/attribution.py

Random transcoders on a random model find no meaningful circuit; the point is the API
and the checks: input-invariant top-k queries, a path search on one prompt, an
attribution graph (pruned, scored, exported for circuit-tracer's viewer) and an
intervention that reproduces one of its edges. See docs/attribution.md.
"""

import tempfile

import torch

from tl_transcoders import Transcoder, transcoder_config
from tl_transcoders.attribution import (
    Graph,
    Head,
    Node,
    attribute,
    export_graph,
    find_paths,
    graph_scores,
    intervene,
    path_contribution,
    prune,
    run_prompt,
    top_logits,
    top_tokens,
    top_upstream,
    zero,
)
from tl_transcoders.hooks.models import tiny_random_model


def random_transcoder(model, layer: int, seed: int) -> Transcoder:
    """A skip transcoder for `layer` with random encoder, biases and skip (a stand-in
    for a trained one: use `Transcoder.load(path)` for real work)."""
    cfg = transcoder_config(model, layer, d_latent=256, activation="topk", k=8, skip=True)
    transcoder = Transcoder(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transcoder.named_parameters():
            if name != "W_dec":
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return transcoder.eval()


model = tiny_random_model()
transcoders = [random_transcoder(model, layer, seed=layer) for layer in range(model.cfg.n_layers)]
t0, t1, t2, t3 = transcoders
tokens = torch.randint(0, model.cfg.d_vocab, (8,), generator=torch.Generator().manual_seed(0))


def show(top, what: str) -> str:
    return ", ".join(f"{what}{i}: {v:+.3f}" for v, i in zip(top.values.tolist(), top.indices.tolist()))


print("== Input-invariant weights (no prompt) ==")
print("layer-0 latents feeding L2 #7:   ", show(top_upstream(model, t2, 7, t0, k=3), "#"))
print("  ... through head 1.0:          ", show(top_upstream(model, t2, 7, t0, k=3, via=[Head(1, 0)]), "#"))
print("tokens exciting L0 #7:           ", show(top_tokens(model, t0, 7, k=3), "tok "))
print("logits promoted by L3 #7:        ", show(top_logits(model, t3, 7, k=3), "tok "))

print("\n== Paths on one prompt (frozen replacement model) ==")
run = run_prompt(model, transcoders, tokens)
last = len(tokens) - 1
latent = int(run.activations[2][last].argmax())
target = Node("feature", last, 2, latent)
paths = find_paths(run, target, n_paths=5, beam_width=10, max_edges=2)


def label(node: Node) -> str:
    where = f"@{node.position}"
    if node.kind == "feature":
        return f"L{node.layer}#{node.index}{where}"
    if node.kind == "head":
        return f"head {node.layer}.{node.index}{where}"
    if node.kind in ("error", "skip"):
        return f"{node.kind} L{node.layer}{where}"
    return f"{node.kind}{where}"


print(f"strongest paths into {label(target)}:")
for path in paths:
    print(f"  {path.contribution:+.4f}  " + " -> ".join(label(n) for n in path.nodes))
assert abs(path_contribution(run, paths[0].nodes) - paths[0].contribution) <= 1e-4 * abs(paths[0].contribution)

print("\n== Attribution graph ==")
graph = attribute(model, transcoders, tokens, max_n_logits=5, desired_logit_prob=0.9)
print(
    f"{graph.n_features} features, {graph.n_layers} x {graph.n_pos} error nodes, {graph.n_pos} tokens, "
    f"{graph.n_logits} logits -> adjacency {tuple(graph.adjacency.shape)}"
)
scores = graph_scores(graph)
print(f"replacement score {scores.replacement:.3f}, completeness {scores.completeness:.3f}")
result = prune(graph, node_threshold=0.8, edge_threshold=0.98)
print(f"pruned: {result.graph.n_features} features, {int(result.edge_mask.sum())} edges kept")

with tempfile.TemporaryDirectory() as directory:
    saved = Graph.load(graph.save(f"{directory}/graph.safetensors"))
    assert torch.equal(saved.adjacency, graph.adjacency)
    path = export_graph(graph, directory, "tiny-demo")
    print(f"exported {path.name} (+ graph-metadata.json) for circuit-tracer's viewer")

try:
    from tl_transcoders.attribution import plot_graph

    figure = plot_graph(result.graph)  # figure.show() in a notebook
    print(f"plot: {len(figure.data)} plotly traces")
except ImportError:
    print("plot: skipped (pip install 'tl-transcoders[plot]')")

print("\n== Intervention: zero the feature with the largest edge into the top logit ==")
edges = graph.adjacency[graph.logit_node(0), : graph.n_features]
node = int(edges.abs().argmax())
layer, position, latent = graph.features[node].tolist()
everything = range(model.cfg.n_layers)  # frozen attention + constrained layers: the graph's linear model
outcome = intervene(model, transcoders, tokens, [zero(layer, position, latent)], constrained_layers=everything)
change = outcome.change[-1] - outcome.change[-1].mean()  # the logit targets are demeaned
token = int(graph.logit_tokens[0])
print(
    f"L{layer}#{latent}@{position}: edge {float(edges[node]):+.5f}, "
    f"demeaned logit change when zeroed {float(change[token]):+.5f} (expected -edge)"
)
