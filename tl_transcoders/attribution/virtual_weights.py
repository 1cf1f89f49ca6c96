"""Input-invariant attribution between transcoder features, tokens and logits.

Following Dunefsky et al. (2024), the connection from a source to a target is the dot
product of what the source writes into the residual stream with the residual direction
the target reads, pulled back through the linear maps between them. Every norm scale
(and, through a head, the attention pattern) is the only input-dependent factor: it
is a positive scalar per position and is left out here; `paths` puts it back.

Readers (row vectors `d` with value `residual . d`):
- a feature j of a transcoder reading the MLP input (`mlp.hook_in`, `ln2.hook_out`):
  `centre(w_ln2 * W_enc[j])` (`centre` only for LayerNorm; `w_ln2` is ones where the
  weight is folded); reading `ln2.hook_normalized` (before the weight):
  `centre(W_enc[j])`; reading the residual (`hook_resid_mid`, `hook_mlp_in`): `W_enc[j]`;
- a logit k (the unembedding output, before any soft-cap): `centre(w_final * W_U[:, k])`.

Writers: a feature writes `W_dec[i]` at `hook_mlp_out`; at `mlp.hook_out` of a model with
a post-MLP norm (Gemma-2 `ln2_post`) it writes `w_ln2_post * centre(W_dec[i])`. A token
writes its embedding row (scaled as the model scales it).

Edges (`via`), each a linear map of the residual stream when scales and patterns are
frozen, usable in any chain that respects the layer order:
- `Head(m, h)`: reads the stream before attention `m` at a source position and writes
  after it at a destination position: `d -> centre(w_ln1 * W_V^h W_O^h centre(w_ln1_post * d))`
  (with `W_OV^h = W_V^h W_O^h` and grouped key/value heads expanded);
- a skip transcoder of layer m: its skip term `x @ W_skip.T` is linear in its input,
  so a source that writes before layer m's MLP changes layer m's MLP *output* through
  `W_skip^m`, and through it every later reader. This path is input-invariant up to
  layer m's norm scale. Its pull-back is `read_m(W_skip^T write_m^T d)`. Chains of several
  skips and heads are also input-invariant (one scale per edge) and are accepted.
  The transcoders' *latent* paths are not linear and are never edges.

Layer order: a feature of layer l writes after MLP l; a head of layer m reads before
attention m and writes after it; a feature of layer n reads before MLP n. So a head
edge needs l < m <= n and a skip edge l < m < n.

A cross-layer transcoder's features take part as `CrossLayerFeatures(clt, layer)`: they
read layer `layer`'s input like a transcoder of that layer, and as a source they write
the sum of their decoders into every layer whose output joins the stream before the
target (or the first edge of the chain) reads it.

Top-k queries work blockwise over source and target latents with a running top-k, so
dictionaries of 10^5 latents never need a dense latents x latents matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_transcoders.attribution.errors import AttributionError
from tl_transcoders.attribution.model_weights import (
    NormAffine,
    check_layer,
    embedding_matrix,
    norm_affine,
    unembedding,
    value_output_weights,
)
from tl_transcoders.core.clt import CrossLayerTranscoder
from tl_transcoders.core.config import layer_of
from tl_transcoders.core.errors import check_at_least
from tl_transcoders.core.transcoder import Transcoder
from tl_transcoders.hooks.sites import probe_norm
from tl_transcoders.hooks.splice import SpliceError, check_compatible, describe

__all__ = [
    "CrossLayerFeatures",
    "Features",
    "Head",
    "Mode",
    "TopK",
    "TopPairs",
    "blockwise_topk",
    "check_transcoders",
    "embedding_weights",
    "feature_weights",
    "input_norm",
    "logit_directions",
    "logit_weights",
    "output_norm",
    "pull_back",
    "pull_back_head",
    "pull_back_heads",
    "pull_back_skip",
    "read_directions",
    "read_point",
    "target_point",
    "top_connections",
    "top_downstream",
    "top_logits",
    "top_tokens",
    "top_upstream",
    "write_directions",
    "write_point",
]

Mode = Literal["absolute", "positive", "negative"]


class CrossLayerFeatures(NamedTuple):
    """The features of layer `layer` of a cross-layer transcoder, as the source or the
    target of virtual weights. They read layer `layer`'s input site; as a source they
    write into that layer's output and every later one's, so a target (or the first
    edge of a chain) reading at layer t sees the sum of their decoders into the layers
    before t."""

    clt: CrossLayerTranscoder
    layer: int


Features = Transcoder | CrossLayerFeatures
"""A per-layer transcoder, or one layer's features of a cross-layer transcoder."""


def _module(features: Features) -> Transcoder | CrossLayerTranscoder:
    return features.clt if isinstance(features, CrossLayerFeatures) else features


def _layer(features: Features) -> int:
    return features.layer if isinstance(features, CrossLayerFeatures) else features.cfg.layer


def _input_site(features: Features) -> str:
    if isinstance(features, CrossLayerFeatures):
        return features.clt.cfg.input_site(features.layer)
    return features.cfg.input_site


def _encoder(features: Features) -> Tensor:
    if isinstance(features, CrossLayerFeatures):
        return features.clt.W_enc.detach()[features.clt.index_of(features.layer)]
    return features.W_enc.detach()


def _decoders(features: Features) -> list[tuple[int, str, Tensor]]:
    """(layer, output site, decoder [d_latent, d_model]) of every layer the features write into."""
    if isinstance(features, CrossLayerFeatures):
        clt, i = features.clt, features.clt.index_of(features.layer)
        W = clt.W_dec[i].detach()
        return [
            (u, clt.cfg.output_site(u), W[:, u - features.layer]) for u in range(features.layer, clt.layers[-1] + 1)
        ]
    return [(features.cfg.layer, features.cfg.output_site, features.W_dec.detach())]


@dataclass(frozen=True)
class Head:
    """Attention head `head` of block `layer`, as an edge of a path."""

    layer: int
    head: int


# Points along the residual stream: 2m is before attention m, 2m + 1 before MLP m,
# 2 * n_layers before the final norm.
def read_point(edge: Head | Features) -> int:
    """The residual point an edge or target features read."""
    return 2 * edge.layer if isinstance(edge, Head) else 2 * _layer(edge) + 1


def write_point(edge: Head | Features) -> int:
    """The residual point an edge or source features write (first, for a cross-layer
    transcoder's features, which write at every later layer too)."""
    return 2 * edge.layer + 1 if isinstance(edge, Head) else 2 * _layer(edge) + 2


def _first_read(via: Sequence[Head | Transcoder], reads_at: int) -> int:
    """Where a chain first reads the stream: its first edge, or the target."""
    return read_point(via[0]) if via else reads_at


def _point_name(point: int) -> str:
    layer, after_attention = divmod(point, 2)
    return f"before {'MLP' if after_attention else 'attention'} {layer}"


_RESIDUAL_INPUTS = ("hook_resid_mid", "hook_mlp_in")
_AFFINE_INPUTS = ("mlp.hook_in", "ln2.hook_out")


def _input_kind(transcoder: Features) -> str:
    site = _input_site(transcoder)
    for kind, suffixes in (
        ("affine", _AFFINE_INPUTS),
        ("normalized", ("ln2.hook_normalized",)),
        ("residual", _RESIDUAL_INPUTS),
    ):
        if site.endswith(suffixes):
            return kind
    raise AttributionError(
        f"{describe(transcoder)}: attribution supports transcoders reading the MLP input "
        f"({', '.join(_AFFINE_INPUTS)}), ln2.hook_normalized or the residual stream "
        f"({', '.join(_RESIDUAL_INPUTS)}), not {site}"
    )


def output_norm(
    model: nn.Module, transcoder: Transcoder | CrossLayerTranscoder, site: str | None = None
) -> NormAffine | None:
    """The post-MLP norm a transcoder's output (at `site`, default its output site)
    passes through before it joins the residual stream, or None (written as is)."""
    if site is None:
        site = transcoder.cfg.output_site
    if site.endswith("hook_mlp_out"):
        return None
    if site.endswith("mlp.hook_out"):
        return norm_affine(model, f"blocks.{layer_of(site)}.ln2_post")
    raise AttributionError(
        f"{describe(transcoder)}: attribution supports transcoders writing hook_mlp_out or mlp.hook_out, not {site}"
    )


def input_norm(model: nn.Module, transcoder: Features) -> NormAffine | None:
    """The norm between the residual stream and what `transcoder` reads, with its weight
    and bias only where the input site is after them (`ln2.hook_normalized` is before
    them, except in TransformerLens 2.x LayerNorm); None for a residual-stream site."""
    kind = _input_kind(transcoder)
    if kind == "residual":
        return None
    norm = norm_affine(model, f"blocks.{_layer(transcoder)}.ln2")
    if norm is None:
        return None
    if kind == "normalized" and probe_norm(model, f"blocks.{_layer(transcoder)}.ln2").hook_before_affine:
        return NormAffine(norm.centres, torch.ones_like(norm.weight), torch.zeros_like(norm.bias))
    return norm


def check_transcoders(model: nn.Module, transcoders: Sequence[Features]) -> None:
    """Raise `AttributionError` unless every transcoder fits `model` (as `splice` checks)
    and its sites are ones attribution understands."""
    modules = list({id(_module(t)): _module(t) for t in transcoders}.values())
    try:
        check_compatible(model, modules)
    except SpliceError as err:
        raise AttributionError(str(err)) from err
    for features in transcoders:
        _input_kind(features)
        for _, site, _ in _decoders(features):
            output_norm(model, _module(features), site)
        module = _module(features)
        widths = {"d_model": module.cfg.d_model} if isinstance(module, CrossLayerTranscoder) else {}
        widths = widths or {"d_in": module.cfg.d_in, "d_out": module.cfg.d_out}
        for name, width in widths.items():
            if width != model.cfg.d_model:
                raise AttributionError(
                    f"{describe(module)}: {name}={width}, but attribution "
                    f"needs residual-width sites (d_model={model.cfg.d_model})"
                )


def _latents(transcoder: Features, latents: Int[Tensor, " n"] | Sequence[int] | None) -> Tensor:
    module = _module(transcoder)
    d_latent = module.cfg.d_latent
    device = module.W_enc.device
    if latents is None:
        return torch.arange(d_latent, device=device)
    latents = torch.as_tensor(latents, device=device).reshape(-1)
    if latents.is_floating_point() or latents.is_complex() or latents.dtype == torch.bool:
        raise AttributionError(f"{describe(module)}: latent indices must be integers, got dtype {latents.dtype}")
    bad = latents[(latents < 0) | (latents >= d_latent)]
    if bad.numel():
        raise AttributionError(f"{describe(module)}: latent index {int(bad[0])} is out of range (0..{d_latent - 1})")
    return latents


def read_directions(
    model: nn.Module, transcoder: Features, latents: Int[Tensor, " n"] | Sequence[int] | None = None
) -> Float[Tensor, "n d_model"]:
    """The residual directions the encoder of each latent reads (all latents by
    default), with the norm scale left out."""
    W_enc = _encoder(transcoder)[_latents(transcoder, latents)]
    norm = input_norm(model, transcoder)
    return W_enc if norm is None else norm.pull_back(W_enc)


def write_directions(
    model: nn.Module,
    transcoder: Features,
    latents: Int[Tensor, " n"] | Sequence[int] | None = None,
    before: int | None = None,
) -> Float[Tensor, "n d_model"]:
    """What each latent writes into the residual stream per unit of activation (its
    decoder row, through a post-MLP norm where the output site is before one). A
    cross-layer transcoder's features write the sum of their decoders into every layer
    whose output joins the stream no later than residual point `before` (all by
    default)."""
    index = _latents(transcoder, latents)
    total = None
    for layer, site, W_dec in _decoders(transcoder):
        if before is not None and 2 * layer + 2 > before:
            continue
        norm = output_norm(model, _module(transcoder), site)
        written = W_dec[index] if norm is None else norm.push_forward(W_dec[index])
        total = written if total is None else total + written
    return total


def logit_directions(
    model: nn.Module, tokens: Int[Tensor, " n"] | Sequence[int] | None = None
) -> Float[Tensor, "n d_model"]:
    """The residual direction each logit reads (all tokens by default), through the
    final norm's weight and centring, its scale left out."""
    W_U, _ = unembedding(model)
    if tokens is not None:
        tokens = torch.as_tensor(tokens, device=W_U.device).reshape(-1)
        bad = tokens[(tokens < 0) | (tokens >= W_U.shape[1])]
        if bad.numel():
            raise AttributionError(f"token id {int(bad[0])} is out of range (0..{W_U.shape[1] - 1})")
        W_U = W_U[:, tokens]
    norm = norm_affine(model, "ln_final")
    return W_U.T if norm is None else norm.pull_back(W_U.T)


def pull_back_heads(
    model: nn.Module, layer: int, directions: Float[Tensor, "n d_model"]
) -> Float[Tensor, "n_heads n d_model"]:
    """For every head of `layer`, the directions at its source position whose dot
    product with the stream equals the head's output dotted with `directions` (per unit
    of attention, scales of ln1 and any ln1_post left out):
    `centre(w_ln1 * W_OV (centre(w_ln1_post * d)))`."""
    check_layer(model, layer)
    W_V, W_O = value_output_weights(model, layer)
    post = norm_affine(model, f"blocks.{layer}.ln1_post")
    if post is not None:
        directions = post.pull_back(directions)
    out = directions @ W_O.transpose(1, 2) @ W_V.transpose(1, 2)
    pre = norm_affine(model, f"blocks.{layer}.ln1")
    return out if pre is None else pre.pull_back(out)


def pull_back_head(model: nn.Module, head: Head, directions: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
    """`pull_back_heads` for one head."""
    if not 0 <= head.head < model.cfg.n_heads:
        raise AttributionError(f"head {head.head} is out of range: layer {head.layer} has {model.cfg.n_heads} heads")
    return pull_back_heads(model, head.layer, directions)[head.head]


def pull_back_skip(
    model: nn.Module, transcoder: Transcoder, directions: Float[Tensor, "n d_model"]
) -> Float[Tensor, "n d_model"]:
    """The directions before a skip transcoder's MLP whose dot product with the stream
    equals its skip term's contribution along `directions` (norm scales left out)."""
    if not transcoder.cfg.skip:
        raise AttributionError(f"{describe(transcoder)} has no skip term, so it is not a path edge")
    out_norm = output_norm(model, transcoder)
    if out_norm is not None:
        directions = out_norm.pull_back(directions)
    out = directions @ transcoder.W_skip.detach()
    in_norm = input_norm(model, transcoder)
    return out if in_norm is None else in_norm.pull_back(out)


def pull_back(
    model: nn.Module,
    directions: Float[Tensor, "n d_model"],
    via: Sequence[Head | Transcoder],
    reads_at: int,
    written_at: int,
) -> Float[Tensor, "n d_model"]:
    """Pull `directions`, read at residual point `reads_at`, back through the edges
    `via` (listed from source to target) to a writer at point `written_at`, checking
    the layer order."""
    points = [written_at]
    for edge in via:
        points += [read_point(edge), write_point(edge)]
    points.append(reads_at)
    for i in range(0, len(points), 2):
        if points[i] > points[i + 1]:
            what = "the source" if i == 0 else f"edge {via[i // 2 - 1]!r}"
            then = "the target" if i + 2 == len(points) else f"edge {via[i // 2]!r}"
            raise AttributionError(
                f"{what} writes {_point_name(points[i] - 1)}'s output, after {then} reads "
                f"({_point_name(points[i + 1])}): order sources, edges and targets by layer"
            )
    for edge in reversed(via):
        if isinstance(edge, Head):
            directions = pull_back_head(model, edge, directions)
        else:
            directions = pull_back_skip(model, edge, directions)
    return directions


def target_point(model: nn.Module, target: Features | None) -> int:
    """The residual point a target transcoder reads, or the logits' (None)."""
    return 2 * model.cfg.n_layers if target is None else read_point(target)


def _check(model: nn.Module, *transcoders: Features | None, via: Sequence[Head | Transcoder] = ()) -> None:
    """Refuse sources and targets that are not features, `via` edges that are not heads
    or per-layer transcoders, heads outside the model, and transcoders that do not fit it."""
    for t in transcoders:
        if isinstance(t, CrossLayerTranscoder):
            raise AttributionError(
                "a cross-layer transcoder's features sit at one of its layers: pass CrossLayerFeatures(clt, layer)"
            )
        if t is not None and not isinstance(t, (Transcoder, CrossLayerFeatures)):
            raise AttributionError(f"expected a Transcoder or CrossLayerFeatures, got {type(t).__name__}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    for edge in via:
        if isinstance(edge, Head):
            if not (0 <= edge.layer < n_layers and 0 <= edge.head < n_heads):
                raise AttributionError(
                    f"head {edge.head} of layer {edge.layer} is not a head of this model "
                    f"({n_layers} layers of {n_heads} heads)"
                )
        elif not isinstance(edge, Transcoder):
            raise AttributionError(
                f"via takes Head(layer, head) edges and per-layer skip Transcoders, got {type(edge).__name__}"
            )
    unique = {id(t): t for t in (*transcoders, *via) if isinstance(t, (Transcoder, CrossLayerFeatures))}
    check_transcoders(model, list(unique.values()))


def feature_weights(
    model: nn.Module,
    source: Features,
    target: Features,
    source_latents: Int[Tensor, " n_source"] | Sequence[int] | None = None,
    target_latents: Int[Tensor, " n_target"] | Sequence[int] | None = None,
    via: Sequence[Head | Transcoder] = (),
) -> Float[Tensor, "n_source n_target"]:
    """Input-invariant weights from source latents to target latents through the
    residual stream, or through the edges `via` (dense: select latents for large
    dictionaries, or use the top-k queries)."""
    _check(model, source, target, via=via)
    reads = read_directions(model, target, target_latents)
    reads = pull_back(model, reads, via, read_point(target), write_point(source))
    before = _first_read(via, read_point(target))
    return write_directions(model, source, source_latents, before) @ reads.T


def embedding_weights(
    model: nn.Module,
    target: Features | None,
    latents: Int[Tensor, " n_target"] | Sequence[int] | None = None,
    via: Sequence[Head | Transcoder] = (),
) -> Float[Tensor, "d_vocab n_target"]:
    """De-embedding: the weight of every token's embedding on target latents (or, with
    `target=None`, on the logits of the tokens `latents`), directly or through `via`."""
    _check(model, target, via=via)
    reads = logit_directions(model, latents) if target is None else read_directions(model, target, latents)
    reads = pull_back(model, reads, via, target_point(model, target), 0)
    return embedding_matrix(model) @ reads.T


def logit_weights(
    model: nn.Module,
    source: Features,
    latents: Int[Tensor, " n_source"] | Sequence[int] | None = None,
    tokens: Int[Tensor, " n_tokens"] | Sequence[int] | None = None,
    via: Sequence[Head | Transcoder] = (),
) -> Float[Tensor, "n_source n_tokens"]:
    """How much each source latent raises each logit (unembedding output), through
    the final norm's weight and `W_U`, directly or through `via`."""
    _check(model, source, via=via)
    reads = pull_back(model, logit_directions(model, tokens), via, target_point(model, None), write_point(source))
    before = _first_read(via, target_point(model, None))
    return write_directions(model, source, latents, before) @ reads.T


@dataclass
class TopK:
    """The `k` strongest entries of a query: signed weights, best first, and the indices
    (latents or token ids) they belong to."""

    values: Float[Tensor, " k"]
    indices: Int[Tensor, " k"]


@dataclass
class TopPairs:
    """The `k` strongest source -> target connections, best first."""

    values: Float[Tensor, " k"]
    sources: Int[Tensor, " k"]
    targets: Int[Tensor, " k"]


def _score(values: Tensor, mode: Mode) -> Tensor:
    if mode == "absolute":
        return values.abs()
    if mode == "positive":
        return values
    if mode == "negative":
        return -values
    raise AttributionError(f"mode must be 'absolute', 'positive' or 'negative', got {mode!r}")


def blockwise_topk(
    rows: Float[Tensor, "n_rows d_model"],
    columns: Float[Tensor, "n_columns d_model"],
    k: int,
    mode: Mode = "absolute",
    block_size: int = 4096,
) -> TopPairs:
    """The top `k` entries of `rows @ columns.T`, computed block by block with a
    running top-k, never holding more than `block_size` x `block_size` products."""
    check_at_least(AttributionError, 1, k=k, block_size=block_size)
    n_rows, n_columns = rows.shape[0], columns.shape[0]
    best_scores = rows.new_empty(0)
    best = (rows.new_empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    for r0 in range(0, n_rows, block_size):
        for c0 in range(0, n_columns, block_size):
            block = rows[r0 : r0 + block_size] @ columns[c0 : c0 + block_size].T
            flat_scores = _score(block, mode).reshape(-1)
            top = flat_scores.topk(min(k, flat_scores.numel())).indices
            r, c = top // block.shape[1], top % block.shape[1]
            scores = torch.cat([best_scores, flat_scores[top]])
            values = torch.cat([best[0], block[r, c]])
            sources = torch.cat([best[1], (r + r0).cpu()])
            targets = torch.cat([best[2], (c + c0).cpu()])
            keep = scores.topk(min(k, scores.numel())).indices
            best_scores = scores[keep]
            best = (values[keep], sources[keep.cpu()], targets[keep.cpu()])
    return TopPairs(values=best[0], sources=best[1], targets=best[2])


def _top_of_vector(rows: Tensor, column: Tensor, k: int, mode: Mode, block_size: int) -> TopK:
    pairs = blockwise_topk(rows, column[None], k, mode, block_size)
    return TopK(values=pairs.values, indices=pairs.sources)


def _one_latent(transcoder: Features, latent: int) -> Tensor:
    return _latents(transcoder, [latent])


def top_upstream(
    model: nn.Module,
    target: Features,
    latent: int,
    source: Features,
    k: int = 10,
    via: Sequence[Head | Transcoder] = (),
    mode: Mode = "absolute",
    block_size: int = 4096,
) -> TopK:
    """The `k` latents of `source` with the strongest input-invariant weight onto
    latent `latent` of `target` (directly or through `via`)."""
    _check(model, source, target, via=via)
    read = pull_back(
        model, read_directions(model, target, _one_latent(target, latent)), via, read_point(target), write_point(source)
    )
    before = _first_read(via, read_point(target))
    return _top_of_vector(write_directions(model, source, None, before), read[0], k, mode, block_size)


def top_downstream(
    model: nn.Module,
    source: Features,
    latent: int,
    target: Features,
    k: int = 10,
    via: Sequence[Head | Transcoder] = (),
    mode: Mode = "absolute",
    block_size: int = 4096,
) -> TopK:
    """The `k` latents of `target` most strongly driven by latent `latent` of `source`."""
    _check(model, source, target, via=via)
    reads = pull_back(model, read_directions(model, target), via, read_point(target), write_point(source))
    write = write_directions(model, source, _one_latent(source, latent), _first_read(via, read_point(target)))[0]
    return _top_of_vector(reads, write, k, mode, block_size)


def top_tokens(
    model: nn.Module,
    target: Features,
    latent: int,
    k: int = 10,
    via: Sequence[Head | Transcoder] = (),
    mode: Mode = "positive",
    block_size: int = 4096,
) -> TopK:
    """The `k` tokens whose embeddings most excite latent `latent` of `target`
    (directly, or from a source position through a head in `via`)."""
    _check(model, target, via=via)
    read = pull_back(model, read_directions(model, target, _one_latent(target, latent)), via, read_point(target), 0)
    return _top_of_vector(embedding_matrix(model), read[0], k, mode, block_size)


def top_logits(
    model: nn.Module,
    source: Features,
    latent: int,
    k: int = 10,
    mode: Mode = "positive",
    via: Sequence[Head | Transcoder] = (),
    block_size: int = 4096,
) -> TopK:
    """The `k` tokens whose logits latent `latent` of `source` promotes most
    (`mode="positive"`) or suppresses most (`mode="negative"`)."""
    _check(model, source, via=via)
    write = write_directions(model, source, _one_latent(source, latent), _first_read(via, target_point(model, None)))[0]
    reads = pull_back(model, logit_directions(model), via, target_point(model, None), write_point(source))
    return _top_of_vector(reads, write, k, mode, block_size)


def top_connections(
    model: nn.Module,
    source: Features,
    target: Features,
    k: int = 10,
    via: Sequence[Head | Transcoder] = (),
    mode: Mode = "absolute",
    block_size: int = 4096,
) -> TopPairs:
    """The `k` strongest (source latent, target latent) weights between two
    transcoders, blockwise: memory `(n_source + n_target) * d_model + block_size^2`."""
    _check(model, source, target, via=via)
    reads = pull_back(model, read_directions(model, target), via, read_point(target), write_point(source))
    before = _first_read(via, read_point(target))
    return blockwise_topk(write_directions(model, source, None, before), reads, k, mode, block_size)
