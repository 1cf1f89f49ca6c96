"""Input-dependent attribution on one prompt, and a beam search over computational paths.

`run_prompt` runs the model once with the transcoders spliced in (with error terms, so
every value is the clean model's) and records what the frozen replacement model needs:
each transcoder's latent activations, its error term, its skip output, the attention
patterns, every norm's scale, the token embeddings and the residual stream before
attention and before each MLP.

With patterns and norm scales frozen, the replacement model is linear in the values of
its *source* nodes (features, error terms, token embeddings) along *edges* (an attention
head's OV circuit from one position to another, a transcoder's skip term). A path
source -> edges -> target contributes

    (what the source writes) . (target's read direction pulled back through the edges)

where each factor is an input-invariant weight (`virtual_weights`) times the frozen
scalars: the source's activation, 1 / (norm scale) at every norm the path crosses, and
the attention pattern at each head. A target is a feature's pre-activation less its
bias, or a logit (the unembedding output, before any soft-cap). The contribution of an
edge node (its "flow") is the residual stream it reads dotted with the pulled-back
direction: everything upstream of it, biases included, that reaches the target through
it. `find_paths` grows paths backwards from the target, keeping the strongest edges
(a beam), as in Dunefsky et al. (2024).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_transcoders.attribution.virtual_weights import (
    AttributionError,
    Head,
    check_transcoders,
    input_norm,
    logit_directions,
    output_norm,
    pull_back_head,
    pull_back_heads,
    pull_back_skip,
    read_directions,
    write_directions,
)
from tl_transcoders.core.errors import check_at_least
from tl_transcoders.core.transcoder import Transcoder
from tl_transcoders.hooks.sites import attach, model_device, store_hook
from tl_transcoders.hooks.splice import describe, splice
from tl_transcoders.hooks.tokens import prompt_tokens

__all__ = [
    "Node",
    "NodeKind",
    "Path",
    "PromptRun",
    "find_paths",
    "path_contribution",
    "run_prompt",
    "target_direction",
]

NodeKind = Literal["feature", "error", "embedding", "head", "skip", "logit"]


@dataclass(frozen=True)
class Node:
    """A node of a path.

    - `feature`: latent `index` of the transcoder of `layer` at `position`;
    - `error`: the error term of `layer` at `position` (the whole MLP output where the
      layer has no transcoder);
    - `embedding`: the embedding (token plus position) at `position`;
    - `head`: head `index` of `layer`, reading `position`; it writes at the position of
      the next node of the path;
    - `skip`: the skip term of the transcoder of `layer` at `position`;
    - `logit`: the logit of token id `index` at `position`.
    """

    kind: NodeKind
    position: int
    layer: int | None = None
    index: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in get_args(NodeKind):
            raise AttributionError(f"node kind must be one of {get_args(NodeKind)}, got {self.kind!r}")
        needed = {"position": True, "layer": self.kind != "embedding" and self.kind != "logit"}
        needed["index"] = self.kind in ("feature", "head", "logit")
        for name, required in needed.items():
            value = getattr(self, name)
            if value is None and not required:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                what = {"index": "latent, head or token id"}.get(name, name)
                raise AttributionError(
                    f"a {self.kind} node needs {name} (its {what}) as an integer >= 0, got {value!r}"
                )


@dataclass
class Path:
    """A path from a source node to a target node, listed source first, with its
    contribution to the target in the frozen replacement model."""

    nodes: tuple[Node, ...]
    contribution: float


@dataclass
class PromptRun:
    """What one spliced forward pass of a prompt recorded (see the module docstring).

    Per-layer tensors are indexed by layer; scales are 1 where a norm is absent."""

    model: nn.Module
    transcoders: dict[int, Transcoder]
    tokens: Int[Tensor, " n_pos"]
    activations: dict[int, Float[Tensor, "n_pos d_latent"]]
    errors: Float[Tensor, "n_layers n_pos d_model"]  # as written into the residual stream
    skips: dict[int, Float[Tensor, "n_pos d_model"]]  # skip outputs as written into the stream
    patterns: Float[Tensor, "n_layers n_heads n_pos n_pos"]
    scales: dict[str, Float[Tensor, " n_pos"]]  # norm name (e.g. blocks.2.ln1) -> scale
    embeddings: Float[Tensor, "n_pos d_model"]
    resid_pre: Float[Tensor, "n_layers n_pos d_model"]
    resid_mid: Float[Tensor, "n_layers n_pos d_model"]

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    def scale(self, norm: str) -> Float[Tensor, " n_pos"]:
        """The scale of norm `norm` at every position (ones if the model has none)."""
        if norm in self.scales:
            return self.scales[norm]
        return torch.ones(self.n_pos, dtype=self.embeddings.dtype, device=self.embeddings.device)


_NORMS = ("ln1", "ln2", "ln1_post", "ln2_post")


def run_prompt(model: nn.Module, transcoders: Sequence[Transcoder], tokens: str | Tensor) -> PromptRun:
    """Run `model` once on one prompt (a string, or token ids `[n_pos]` / `[1, n_pos]`)
    with `transcoders` (at most one per layer, in increasing layer order) spliced in,
    and record what attribution needs. A layer without a transcoder keeps its MLP, whose
    whole output is that layer's error node."""
    transcoders = list(transcoders)
    clts = [t for t in transcoders if not isinstance(t, Transcoder)]
    if clts:
        raise AttributionError(
            f"run_prompt and find_paths take per-layer transcoders, got a {type(clts[0]).__name__}; "
            "attribute() and the virtual weights (CrossLayerFeatures) take cross-layer transcoders"
        )
    layers = [t.cfg.layer for t in transcoders]
    if layers != sorted(set(layers)):
        raise AttributionError(
            f"transcoders must be given one per layer in increasing layer order, got layers {layers}"
        )
    check_transcoders(model, transcoders)
    tokens = prompt_tokens(model, tokens)
    n_layers = model.cfg.n_layers
    cache: dict[str, Tensor] = {}
    sites = ["ln_final.hook_scale"]
    for layer in range(n_layers):
        sites += [
            f"blocks.{layer}.hook_resid_pre",
            f"blocks.{layer}.hook_resid_mid",
            f"blocks.{layer}.attn.hook_pattern",
            f"blocks.{layer}.hook_mlp_out",
        ]
        sites += [f"blocks.{layer}.{norm}.hook_scale" for norm in _NORMS]
    for transcoder in transcoders:
        sites += [transcoder.cfg.input_site, transcoder.cfg.output_site]
    sites = [s for s in dict.fromkeys(sites) if s in model.hook_dict or s.endswith(("mlp.hook_in", "mlp.hook_out"))]

    hooks = [(site, store_hook(cache, site, lambda a: a.detach()[0], keep_first=True)) for site in sites]
    with torch.no_grad(), splice(model, transcoders, error_term=True), attach(model, hooks):
        model(tokens[None].to(model_device(model)))

    by_layer = {t.cfg.layer: t for t in transcoders}
    scales = {
        name.removesuffix(".hook_scale"): value.reshape(-1)
        for name, value in cache.items()
        if name.endswith("hook_scale")
    }
    run = PromptRun(
        model=model,
        transcoders=by_layer,
        tokens=tokens,
        activations={},
        errors=torch.stack([cache[f"blocks.{layer}.hook_mlp_out"] for layer in range(n_layers)]),
        skips={},
        patterns=torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(n_layers)]),
        scales=scales,
        embeddings=cache["blocks.0.hook_resid_pre"],
        resid_pre=torch.stack([cache[f"blocks.{layer}.hook_resid_pre"] for layer in range(n_layers)]),
        resid_mid=torch.stack([cache[f"blocks.{layer}.hook_resid_mid"] for layer in range(n_layers)]),
    )
    with torch.no_grad():
        for layer, transcoder in by_layer.items():
            x = cache[transcoder.cfg.input_site].to(transcoder.W_enc.dtype)
            latents = transcoder.encode(x)
            run.activations[layer] = latents
            out = transcoder(x)
            error = cache[transcoder.cfg.output_site] - out
            run.errors[layer] = _to_residual(run, transcoder, error)
            if transcoder.cfg.skip:
                run.skips[layer] = _to_residual(run, transcoder, x @ transcoder.W_skip.T)
    return run


def _write_scale(run: PromptRun, transcoder: Transcoder) -> Float[Tensor, " n_pos"]:
    """The frozen scale of the post-MLP norm a transcoder's output passes through (ones
    where it is written into the residual stream as is)."""
    if output_norm(run.model, transcoder) is None:
        return torch.ones(run.n_pos, dtype=run.embeddings.dtype, device=run.embeddings.device)
    return run.scale(f"blocks.{transcoder.cfg.layer}.ln2_post")


def _to_residual(run: PromptRun, transcoder: Transcoder, vectors: Tensor) -> Tensor:
    """Vectors `[n_pos, d]` at a transcoder's output site as the frozen model writes
    them into the residual stream (through a post-MLP norm's weight and scale, if any)."""
    norm = output_norm(run.model, transcoder)
    if norm is None:
        return vectors
    return norm.push_forward(vectors) / _write_scale(run, transcoder)[:, None]


def _transcoder(run: PromptRun, layer: int) -> Transcoder:
    if layer not in run.transcoders:
        raise AttributionError(f"no transcoder for layer {layer} was given (layers {sorted(run.transcoders)})")
    return run.transcoders[layer]


def _check_node(run: PromptRun, node: Node) -> None:
    """Refuse a node outside this prompt or model: its position, layer, head or token id."""
    if not node.position < run.n_pos:
        raise AttributionError(f"{node}: position {node.position} is out of range: the prompt has {run.n_pos} tokens")
    cfg = run.model.cfg
    if node.layer is not None and not node.layer < cfg.n_layers:
        raise AttributionError(f"{node}: layer {node.layer} is out of range: the model has {cfg.n_layers} layers")
    bound = {"head": cfg.n_heads, "logit": cfg.d_vocab}.get(node.kind)
    if bound is not None and not node.index < bound:
        raise AttributionError(f"{node}: index {node.index} is out of range (0..{bound - 1})")


def target_direction(run: PromptRun, target: Node) -> tuple[Float[Tensor, " d_model"], int]:
    """The residual direction a target node reads at its position (its frozen scale
    included), and the residual point it reads (see `virtual_weights`)."""
    _check_node(run, target)
    if target.kind == "feature":
        transcoder = _transcoder(run, target.layer)
        direction = read_directions(run.model, transcoder, [target.index])[0]
        if input_norm(run.model, transcoder) is not None:
            direction = direction / run.scale(f"blocks.{target.layer}.ln2")[target.position]
        return direction, 2 * target.layer + 1
    if target.kind == "logit":
        direction = logit_directions(run.model, [target.index])[0]
        return direction / run.scale("ln_final")[target.position], 2 * run.model.cfg.n_layers
    raise AttributionError(f"a target must be a feature or a logit node, got {target.kind!r}")


def _head_weights(run: PromptRun, layer: int, destination: int) -> Float[Tensor, "n_heads n_pos"]:
    """Pattern / (ln1 scale at the source x ln1_post scale at the destination) for
    every head of `layer` and source position, reading into `destination`."""
    scales = run.scale(f"blocks.{layer}.ln1") * run.scale(f"blocks.{layer}.ln1_post")[destination]
    return run.patterns[layer, :, destination] / scales


def _pull_back_edge(
    run: PromptRun, edge: Node, direction: Float[Tensor, " d_model"], destination: int
) -> tuple[Float[Tensor, " d_model"], int]:
    """Pull a direction read at `destination` back through an edge node; returns the
    direction at the edge's input position and the residual point it reads."""
    layer = edge.layer
    if edge.kind == "head":
        weight = _head_weights(run, layer, destination)[edge.index, edge.position]
        return weight * pull_back_head(run.model, Head(layer, edge.index), direction[None])[0], 2 * layer
    if edge.kind == "skip":
        transcoder = _transcoder(run, layer)
        scale = run.scale(f"blocks.{layer}.ln2")[edge.position] if input_norm(run.model, transcoder) else 1.0
        return pull_back_skip(run.model, transcoder, direction[None])[0] / (
            scale * _write_scale(run, transcoder)[edge.position]
        ), 2 * layer + 1
    raise AttributionError(f"an edge must be a head or a skip node, got {edge.kind!r}")


def _source_vector(run: PromptRun, source: Node) -> Float[Tensor, " d_model"]:
    """What a source node writes into the residual stream on this prompt."""
    _check_node(run, source)
    if source.kind == "feature":
        transcoder = _transcoder(run, source.layer)
        _check_latent(run, source)
        value = run.activations[source.layer][source.position, source.index]
        write = write_directions(run.model, transcoder, [source.index])[0]
        return value * write / _write_scale(run, transcoder)[source.position]
    if source.kind == "error":
        return run.errors[source.layer, source.position]
    if source.kind == "embedding":
        return run.embeddings[source.position]
    raise AttributionError(f"a source must be a feature, error or embedding node, got {source.kind!r}")


def _write_point(source: Node) -> int:
    return 0 if source.kind == "embedding" else 2 * source.layer + 2


def path_contribution(run: PromptRun, nodes: Sequence[Node]) -> float:
    """The contribution of the path `nodes` (source, edges..., target) to its target in
    the frozen replacement model. A path may also start at an edge (a head or skip
    node): its value is then the edge's flow, everything reaching the target through
    it (the stream it reads, biases included, times the pulled-back direction)."""
    nodes = list(nodes)
    if len(nodes) < 2:
        raise AttributionError("a path needs at least a source and a target node")
    for node in nodes:
        _check_node(run, node)
    direction, point = target_direction(run, nodes[-1])
    destination = nodes[-1].position
    source = nodes[0]
    starts_at_edge = source.kind in ("head", "skip")
    for edge in reversed(nodes[0 if starts_at_edge else 1 : -1]):
        if edge.kind == "head" and not edge.position <= destination:
            raise AttributionError(f"head edge {edge} reads a later position than it writes ({destination})")
        if edge.kind == "skip" and edge.position != destination:
            raise AttributionError(f"skip edge {edge} must be at the position it writes ({destination})")
        edge_write = 2 * edge.layer + (1 if edge.kind == "head" else 2)
        if edge_write > point:
            raise AttributionError(f"edge {edge} writes after its successor reads: order the path by layer")
        direction, point = _pull_back_edge(run, edge, direction, destination)
        destination = edge.position
    if starts_at_edge:
        stream = run.resid_pre if source.kind == "head" else run.resid_mid
        return float(stream[source.layer, source.position] @ direction)
    if source.position != destination:
        raise AttributionError(f"source {source} is not at the position its successor reads ({destination})")
    if _write_point(source) > point:
        raise AttributionError(f"source {source} writes after its successor reads: order the path by layer")
    return float(_source_vector(run, source) @ direction)


def _check_latent(run: PromptRun, node: Node) -> None:
    transcoder = _transcoder(run, node.layer)
    if not 0 <= node.index < transcoder.cfg.d_latent:
        raise AttributionError(
            f"{describe(transcoder)}: latent index {node.index} is out of range (0..{transcoder.cfg.d_latent - 1})"
        )


def _sources(run: PromptRun, direction: Tensor, point: int, position: int) -> list[tuple[Node, float]]:
    """Every source node writing before `point` at `position`, with its contribution
    along `direction`."""
    found = [(Node("embedding", position), float(run.embeddings[position] @ direction))]
    for layer in range(run.model.cfg.n_layers):
        if 2 * layer + 2 > point:
            break
        found.append((Node("error", position, layer), float(run.errors[layer, position] @ direction)))
        if layer in run.transcoders:
            transcoder = run.transcoders[layer]
            active = run.activations[layer][position].nonzero().reshape(-1)
            writes = write_directions(run.model, transcoder, active) / _write_scale(run, transcoder)[position]
            values = run.activations[layer][position, active] * (writes @ direction)
            found += [(Node("feature", position, layer, int(i)), float(v)) for i, v in zip(active, values)]
    return found


def _edges(run: PromptRun, direction: Tensor, point: int, position: int) -> list[tuple[Node, Tensor, int, float]]:
    """Every edge writing before `point` at `position`: the edge node, the pulled-back
    direction, the point it reads and its flow."""
    found = []
    for layer in range(run.model.cfg.n_layers):
        if 2 * layer + 1 <= point:
            pulled = pull_back_heads(run.model, layer, direction[None])[:, 0]  # [n_heads, d_model]
            weights = _head_weights(run, layer, position)[:, : position + 1]
            flows = weights * (pulled @ run.resid_pre[layer, : position + 1].T)
            for head, source in weights.nonzero().tolist():
                node = Node("head", source, layer, head)
                found.append((node, weights[head, source] * pulled[head], 2 * layer, float(flows[head, source])))
        if 2 * layer + 2 <= point and layer in run.skips:
            node = Node("skip", position, layer)
            pulled, read = _pull_back_edge(run, node, direction, position)
            found.append((node, pulled, read, float(run.resid_mid[layer, position] @ pulled)))
    return found


def find_paths(run: PromptRun, target: Node, n_paths: int = 10, beam_width: int = 10, max_edges: int = 2) -> list[Path]:
    """The `n_paths` strongest paths into `target` (a feature or logit node), by the
    absolute value of their contribution, from a beam search that at each depth keeps
    the `beam_width` edges of largest absolute flow and follows at most `max_edges`
    edges (heads and skips) per path."""
    check_at_least(AttributionError, 1, n_paths=n_paths, beam_width=beam_width)
    check_at_least(AttributionError, 0, max_edges=max_edges)
    if target.kind == "feature":
        _check_latent(run, target)
    direction, point = target_direction(run, target)
    beam: list[tuple[tuple[Node, ...], Tensor, int, int]] = [((target,), direction, point, target.position)]
    paths: list[Path] = []
    for depth in range(max_edges + 1):
        candidates = []
        for suffix, direction, point, position in beam:
            paths += [Path((node, *suffix), value) for node, value in _sources(run, direction, point, position)]
            if depth < max_edges:
                candidates += [
                    (abs(flow), (edge, *suffix), pulled, read, edge.position)
                    for edge, pulled, read, flow in _edges(run, direction, point, position)
                ]
        candidates.sort(key=lambda c: -c[0])
        beam = [c[1:] for c in candidates[:beam_width]]
    paths.sort(key=lambda p: -abs(p.contribution))
    return paths[:n_paths]
