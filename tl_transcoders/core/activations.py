"""Sparsifying activation functions: TopK, BatchTopK, ReLU and JumpReLU, and the
straight-through step that gives JumpReLU's threshold (and an L0 penalty) a gradient.

Each takes encoder pre-activations `[..., d_latent]`. TopK returns its sparse form
(values and indices of the k kept latents per token); the others return dense latents
of the same shape as their input. `topk` and `batchtopk` define what the sparse kernels
(`kernels.py`) compute without dense pre-activations.

JumpReLU and the step function H(pre - threshold) have zero gradient with respect to
the threshold almost everywhere; with a `bandwidth` they use the rectangle-kernel
pseudo-gradient of Rajamanoharan et al. (2024): d/d threshold is -(threshold /
bandwidth) * K(pre - threshold) * grad for JumpReLU and -(1 / bandwidth) * K * grad for
the step, K the indicator of |pre - threshold| < bandwidth / 2.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "SparseLatents",
    "batchtopk",
    "jumprelu",
    "relu",
    "sparsify_dense",
    "step",
    "topk",
]


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
    pre: Float[Tensor, "*batch d_latent"], threshold: Float[Tensor, " d_latent"], bandwidth: float | None = None
) -> Float[Tensor, "*batch d_latent"]:
    """Keep a pre-activation where it exceeds its latent's threshold, else zero
    (JumpReLU; also BatchTopK at inference, with its calibrated threshold). With a
    `bandwidth` the threshold gets the straight-through gradient (module docstring)."""
    if bandwidth is None:
        return pre * (pre > threshold)
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step(
    pre: Float[Tensor, "*batch d_latent"], threshold: Float[Tensor, " d_latent"], bandwidth: float
) -> Float[Tensor, "*batch d_latent"]:
    """H(pre - threshold), 1 where a latent is active: its sum is the L0 count, whose
    gradient reaches the threshold through the straight-through estimator."""
    return _Step.apply(pre, threshold, bandwidth)


def _near_threshold(pre: Tensor, threshold: Tensor, bandwidth: float, dtype: torch.dtype) -> Tensor:
    return ((pre - threshold).abs() < bandwidth / 2).to(dtype)


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - threshold) with the rectangle-kernel pseudo-gradient for threshold."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        near = _near_threshold(pre, threshold, ctx.bandwidth, grad.dtype)
        grad_threshold = -(threshold / ctx.bandwidth) * near * grad
        return grad * (pre > threshold), grad_threshold.reshape(-1, pre.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    """H(pre - threshold) with the same pseudo-gradient for threshold."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        near = _near_threshold(pre, threshold, ctx.bandwidth, grad.dtype)
        grad_threshold = -(1.0 / ctx.bandwidth) * near * grad
        return None, grad_threshold.reshape(-1, pre.shape[-1]).sum(0), None


def sparsify_dense(latents: Float[Tensor, "*batch d_latent"]) -> SparseLatents:
    """The sparse form of dense latents: per token, the `m` largest values where `m`
    is the largest number of active latents of any token (shorter rows padded with
    zeros)."""
    m = max(int((latents != 0).sum(-1).max().item()) if latents.numel() else 0, 1)
    _, indices = torch.topk(latents.abs(), m, dim=-1, sorted=False)
    return SparseLatents(latents.gather(-1, indices), indices)
