"""Sparsifying activation functions: TopK, BatchTopK, ReLU and JumpReLU.

Each takes encoder pre-activations `[..., d_latent]`. TopK returns its sparse form
(values and indices of the k kept latents per token); the others return dense latents
of the same shape as their input.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor


class SparseLatents(NamedTuple):
    """The active latents of each token: `values[..., i]` is the activation of latent
    `indices[..., i]`. Rows may be padded with zero values (at arbitrary indices) when
    tokens have different numbers of active latents."""

    values: Float[Tensor, "*batch k"]
    indices: Int[Tensor, "*batch k"]

    def to_dense(self, d_latent: int) -> Float[Tensor, "*batch d_latent"]:
        """Scatter into a dense `[..., d_latent]` tensor."""
        dense = self.values.new_zeros(*self.values.shape[:-1], d_latent)
        return dense.scatter(-1, self.indices, self.values)


def topk(pre: Float[Tensor, "*batch d_latent"], k: int) -> SparseLatents:
    """ReLU, then keep the k largest latents of each token (ties broken by torch.topk)."""
    values, indices = torch.topk(pre, k, dim=-1, sorted=False)
    return SparseLatents(torch.relu(values), indices)


def batchtopk(pre: Float[Tensor, "*batch d_latent"], k: int) -> Float[Tensor, "*batch d_latent"]:
    """ReLU, then keep the `k * n_tokens` largest latents over the whole batch, so
    that tokens share the budget of k active latents on average."""
    flat = torch.relu(pre).flatten()
    n_tokens = flat.numel() // pre.shape[-1]
    values, indices = torch.topk(flat, min(k * n_tokens, flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre)


def relu(pre: Float[Tensor, "*batch d_latent"]) -> Float[Tensor, "*batch d_latent"]:
    """Plain ReLU (trained with an L1 penalty for sparsity)."""
    return torch.relu(pre)


def jumprelu(
    pre: Float[Tensor, "*batch d_latent"], threshold: Float[Tensor, " d_latent"]
) -> Float[Tensor, "*batch d_latent"]:
    """Keep a pre-activation where it exceeds its latent's threshold, else zero
    (JumpReLU; also BatchTopK at inference, with its calibrated threshold)."""
    return pre * (pre > threshold)


def sparsify_dense(latents: Float[Tensor, "*batch d_latent"]) -> SparseLatents:
    """The sparse form of dense latents: per token, the `m` largest values where `m`
    is the largest number of active latents of any token (shorter rows padded with
    zeros)."""
    m = max(int((latents != 0).sum(-1).max().item()) if latents.numel() else 0, 1)
    _, indices = torch.topk(latents.abs(), m, dim=-1, sorted=False)
    return SparseLatents(latents.gather(-1, indices), indices)
