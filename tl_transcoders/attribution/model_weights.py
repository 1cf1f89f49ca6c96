"""The model weights circuit attribution needs, read the same way on every model class.

HookedTransformer and TransformerBridge (with or without compatibility mode) store the
same computation under different conventions: folded or unfolded norm weights,
Gemma's `1 + weight` RMSNorm offset, grouped key/value heads stored once per group
(Bridge) or repeated per head (HookedTransformer), an embedding scaled by
`sqrt(d_model)` after the lookup. Rather than encode each convention, this module
*measures* what does not sit in a plain attribute:

- a norm's affine step (`norm_affine`) by running the norm module once on random
  inputs and regressing its output on its own `hook_normalized` value, and whether it
  centres (LayerNorm) or not (RMSNorm) from that value's mean;
- the embedding's scale from `hook_embed` on a two-token probe.

`W_U`, `b_U`, `W_V` and `W_O` are read from the model's attributes, which both classes
provide with the HookedTransformer shapes (except the per-group `W_V` of the Bridge,
expanded here).

Directions in the residual stream are row vectors `d`; a reader computes `r . d`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_transcoders.attribution.errors import AttributionError
from tl_transcoders.hooks.sites import SiteError, capture, model_device, probe_norm

__all__ = [
    "LayerNorms",
    "NormAffine",
    "check_layer",
    "embedding_matrix",
    "layer_norms",
    "norm_affine",
    "unembedding",
    "value_output_weights",
]


@dataclass(frozen=True)
class NormAffine:
    """A norm `x -> weight * centre(x) / scale + bias` with its scale left out.

    `centres` is True for LayerNorm (the mean is subtracted first), False for RMSNorm.
    `weight` is the effective multiplier (ones where the model folded it away)."""

    centres: bool
    weight: Float[Tensor, " d_model"]
    bias: Float[Tensor, " d_model"]

    def pull_back(self, directions: Float[Tensor, "*n d_model"]) -> Float[Tensor, "*n d_model"]:
        """The residual directions whose dot product with the norm's input (divided by
        its scale) equals the dot product of `directions` with its output, less the
        bias: `centre(weight * d)` (centring is its own transpose)."""
        out = directions * self.weight
        return out - out.mean(-1, keepdim=True) if self.centres else out

    def push_forward(self, vectors: Float[Tensor, "*n d_model"]) -> Float[Tensor, "*n d_model"]:
        """The norm's output for input `vectors`, less the bias and before dividing by
        its scale: `weight * centre(v)`."""
        if self.centres:
            vectors = vectors - vectors.mean(-1, keepdim=True)
        return vectors * self.weight


def norm_affine(model: nn.Module, name: str) -> NormAffine | None:
    """The affine step of the norm module `name` (e.g. `blocks.2.ln2`, `ln_final`), or
    None when the model has no such module. Measured by running it on random inputs
    (`sites.probe_norm`; exact to the model dtype's rounding: about 1e-7 relative in
    float32): the output regressed on the norm's own normalised vector."""
    try:
        probe = probe_norm(model, name)
    except SiteError as err:
        raise AttributionError(str(err)) from err
    if probe is None:
        return None
    normalized, out = probe.normalized.to(probe.output.device), probe.output
    n_centred = normalized - normalized.mean(0)
    weight = (n_centred * (out - out.mean(0))).sum(0) / n_centred.pow(2).sum(0)
    bias = (out - normalized * weight).mean(0)
    dtype = next(model.parameters()).dtype
    return NormAffine(centres=probe.centres, weight=weight.to(dtype), bias=bias.to(dtype))


def embedding_matrix(model: nn.Module) -> Float[Tensor, "d_vocab d_model"]:
    """The token embeddings as added to the residual stream (`W_E` times any scale the
    model applies after the lookup, e.g. Gemma's `sqrt(d_model)`), without positional
    embeddings."""
    W_E = model.W_E
    probe = torch.tensor([[0, 1]], device=model_device(model))
    embedded = capture(model, probe, ["hook_embed"])["hook_embed"].detach()
    rows = W_E[:2].detach()
    scale = (embedded * rows).sum() / rows.pow(2).sum()
    if not torch.allclose(embedded, scale * rows, rtol=1e-4, atol=1e-6):
        raise AttributionError(
            "hook_embed is not a scalar multiple of W_E on this model; the embedding cannot be read as a matrix"
        )
    return W_E.detach() * scale


def unembedding(model: nn.Module) -> tuple[Float[Tensor, "d_model d_vocab"], Float[Tensor, " d_vocab"]]:
    """`W_U` and `b_U` (zeros where the model has no unembedding bias). Logits here are
    the unembedding output, before any logit soft-cap."""
    W_U = model.W_U.detach()
    b_U = getattr(model, "b_U", None)
    b_U = torch.zeros(W_U.shape[1], dtype=W_U.dtype, device=W_U.device) if b_U is None else b_U.detach()
    return W_U, b_U


def value_output_weights(
    model: nn.Module, layer: int
) -> tuple[Float[Tensor, "n_heads d_model d_head"], Float[Tensor, "n_heads d_head d_model"]]:
    """`W_V` and `W_O` of every head of `layer`, with grouped key/value heads repeated
    so that head h uses value group `h // (n_heads // n_key_value_heads)`."""
    check_layer(model, layer)
    attn = model.blocks[layer].attn
    W_V, W_O = attn.W_V.detach(), attn.W_O.detach()
    n_heads = model.cfg.n_heads
    if W_V.shape[0] != n_heads:
        if n_heads % W_V.shape[0]:
            raise AttributionError(f"layer {layer}: {W_V.shape[0]} value heads do not divide {n_heads} heads")
        W_V = W_V.repeat_interleave(n_heads // W_V.shape[0], dim=0)
    return W_V, W_O


def check_layer(model: nn.Module, layer: int) -> None:
    """Raise `AttributionError` unless `layer` is a block index of `model`."""
    n_layers = model.cfg.n_layers
    if not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise AttributionError(f"layer {layer!r} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")


@dataclass(frozen=True)
class LayerNorms:
    """The norms of one block: `ln1` before attention, `ln2` before the MLP, and the
    Gemma-2 style post-norms `ln1_post` / `ln2_post` (None where absent) through which
    the attention / MLP output passes before it joins the residual stream."""

    ln1: NormAffine | None
    ln2: NormAffine | None
    ln1_post: NormAffine | None
    ln2_post: NormAffine | None


def layer_norms(model: nn.Module, layer: int) -> LayerNorms:
    """The measured norms of block `layer` (see `norm_affine`)."""
    check_layer(model, layer)
    return LayerNorms(
        *(norm_affine(model, f"blocks.{layer}.{name}") for name in ("ln1", "ln2", "ln1_post", "ln2_post"))
    )
