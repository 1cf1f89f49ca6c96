"""The sparse encoder and its decoder: the one forward pass of every transcoder.

    latents = activation(x @ W_enc.T + b_enc)     [..., d_latent]
    output  = latents @ W_dec (+ b_dec)           [..., d_out]

`Transcoder` (one layer) and `CrossLayerTranscoder` (one encoder per layer, decoders
into that layer and every later one) both encode and decode through `encode` and
`decode`. TopK, and BatchTopK selected across the batch (training), go through the
sparse kernels (`kernels.py`: no dense latents, a backward pass that touches only the
selected latents); ReLU, JumpReLU and BatchTopK's per-token inference threshold are
computed densely.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from tl_transcoders.core import activations, kernels
from tl_transcoders.core.activations import SparseLatents
from tl_transcoders.core.config import Activation

__all__ = ["Encoded", "EncoderWeights", "decode", "encode", "uses_sparse_kernels"]


class EncoderWeights(NamedTuple):
    """One encoder's tensors: `threshold` is None for the activations without one."""

    W_enc: Float[Tensor, "d_latent d_in"]
    b_enc: Float[Tensor, " d_latent"]
    threshold: Float[Tensor, " d_latent"] | None


class Encoded(NamedTuple):
    """What `encode` computed: the active latents in sparse form (`latents`, always for
    the sparse kernels, else where asked for), the dense activations (`dense`, where
    they were computed) and the dense pre-activations (`pre_activations`, where computed
    or asked for)."""

    latents: SparseLatents | None
    dense: Float[Tensor, "*batch d_latent"] | None
    pre_activations: Float[Tensor, "*batch d_latent"] | None


def uses_sparse_kernels(activation: Activation, batch_wide: bool) -> bool:
    """TopK always, BatchTopK when it selects across the batch: encoded without dense
    latents."""
    return activation == "topk" or (activation == "batchtopk" and batch_wide)


def encode(
    x: Float[Tensor, "*batch d_in"],
    weights: EncoderWeights,
    activation: Activation,
    k: int | None,
    *,
    batch_wide: bool = False,
    jumprelu_bandwidth: float | None = None,
    return_latents: bool = True,
    return_pre_activations: bool = False,
) -> Encoded:
    """Encode `x` with `activation`: `k` for TopK and BatchTopK; `batch_wide` selects
    BatchTopK's `k * n_tokens` latents across the batch (training) instead of its
    per-token threshold; `jumprelu_bandwidth` turns on JumpReLU's straight-through
    threshold gradient."""
    kernels.check_encoder_input(x, weights.W_enc, weights.b_enc)
    if uses_sparse_kernels(activation, batch_wide):
        select = kernels.topk_encode if activation == "topk" else kernels.batchtopk_encode
        latents = select(x, weights.W_enc, weights.b_enc, k)
        pre = pre_activations(x, weights) if return_pre_activations else None
        return Encoded(latents, None, pre)
    pre = pre_activations(x, weights)
    if activation == "relu":
        dense = activations.relu(pre)
    else:  # JumpReLU, or BatchTopK's inference threshold
        bandwidth = jumprelu_bandwidth if activation == "jumprelu" else None
        dense = activations.jumprelu(pre, weights.threshold, bandwidth)
    return Encoded(activations.sparsify_dense(dense) if return_latents else None, dense, pre)


def pre_activations(x: Float[Tensor, "*batch d_in"], weights: EncoderWeights) -> Float[Tensor, "*batch d_latent"]:
    """Encoder pre-activations `x @ W_enc.T + b_enc`."""
    return torch.nn.functional.linear(x, weights.W_enc, weights.b_enc)


def decode(
    encoded: Encoded, W_dec: Float[Tensor, "d_latent d_out"], b_dec: Float[Tensor, " d_out"] | None
) -> Float[Tensor, "*batch d_out"]:
    """`latents @ W_dec (+ b_dec)`: a gather-and-sum of the active decoder rows where the
    latents were encoded sparsely, a dense product where they were computed densely."""
    if encoded.dense is not None:
        out = encoded.dense @ W_dec
        return out if b_dec is None else out + b_dec
    latents = encoded.latents
    return kernels.sparse_decode(latents.values.to(W_dec.dtype), latents.indices, W_dec, b_dec)
