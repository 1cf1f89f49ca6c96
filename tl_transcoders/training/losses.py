"""Training forward passes and losses, one per activation function.

`training_step(transcoder, x, y, ...)` returns the loss to minimise and the sparse
latents. Every variant minimises FVU (squared error over the batch's variance of the
target) plus its sparsity term: AuxK for TopK, L1 for ReLU, L0 for JumpReLU (whose
threshold learns through a straight-through rectangle-kernel gradient).

In data-parallel training each process holds a shard of the batch. Batch statistics
(the target's variance, the token count) then go through `sum_ranks`, a sum over
processes, so that each process's loss is its share of the global batch's loss and the
gradients summed over processes equal the single-process gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from tl_transcoders.core import activations
from tl_transcoders.core.activations import SparseLatents
from tl_transcoders.core import kernels as sparse
from tl_transcoders.core.transcoder import Transcoder


@dataclass
class StepOutput:
    loss: Tensor
    fvu: Tensor
    latents: SparseLatents


SumRanks = Callable[[Tensor], Tensor]


def no_ranks(total: Tensor) -> Tensor:
    """`SumRanks` of a single process."""
    return total


def variance(y: Tensor, sum_ranks: SumRanks = no_ranks) -> Tensor:
    """Total squared deviation of `y` [n, d] from its mean over the (global) batch."""
    n = sum_ranks(torch.tensor(float(y.shape[0]), dtype=y.dtype))
    mean = sum_ranks(y.detach().sum(0)) / n
    return sum_ranks((y.detach() - mean).pow(2).sum()).clamp_min(1e-12)


def fvu(y: Tensor, y_hat: Tensor, sum_ranks: SumRanks = no_ranks) -> Tensor:
    """Fraction of variance unexplained over a batch `[n, d]`: this process's squared
    error over the global batch's variance (the full FVU when there is one process)."""
    return (y - y_hat).pow(2).sum() / variance(y, sum_ranks)


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - threshold) with a rectangle-kernel pseudo-gradient for threshold."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        grad_threshold = -(threshold / ctx.bandwidth) * near * grad
        return grad * (pre > threshold), grad_threshold.reshape(-1, pre.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    """H(pre - threshold) (the L0 count) with the same pseudo-gradient for threshold."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        grad_threshold = -(1.0 / ctx.bandwidth) * near * grad
        return None, grad_threshold.reshape(-1, pre.shape[-1]).sum(0), None


def training_step(
    transcoder: Transcoder,
    x: Tensor,
    y: Tensor,
    dead: Tensor,
    auxk_alpha: float,
    l1_coefficient: float,
    l0_coefficient: float,
    bandwidth: float,
    sum_ranks: SumRanks = no_ranks,
) -> StepOutput:
    """Loss for one batch: `x` [n, d_in] -> `y` [n, d_out]; `dead` [d_latent] marks
    latents that have not fired recently (the targets of AuxK). `fvu` in the result is
    the global batch's."""
    cfg = transcoder.cfg
    n_tokens = sum_ranks(torch.tensor(float(x.shape[0]), dtype=x.dtype))
    skip = x @ transcoder.W_skip.T if cfg.skip else 0.0
    sparsity = torch.zeros((), dtype=x.dtype)
    if cfg.uses_k:
        # The sparse fast path: the encoder's backward touches only the selected
        # latents and the decoder is a gather-sum of their rows.
        encode = sparse.topk_encode if cfg.activation == "topk" else sparse.batchtopk_encode
        latents = encode(x, transcoder.W_enc, transcoder.b_enc, cfg.k)
        y_hat = sparse.sparse_decode(latents.values, latents.indices, transcoder.W_dec, transcoder.b_dec) + skip
        if cfg.activation == "topk" and auxk_alpha > 0 and dead.any():
            residual = (y - y_hat).detach()
            pre = transcoder.pre_activations(x)
            sparsity = auxk_alpha * _auxk(transcoder, pre, dead, residual, x.shape[-1] // 2, sum_ranks)
    else:
        pre = transcoder.pre_activations(x)
        if cfg.activation == "relu":
            dense = torch.relu(pre)
            sparsity = l1_coefficient * (dense * transcoder.W_dec.norm(dim=-1)).sum() / n_tokens
        else:
            dense = _JumpReLU.apply(pre, transcoder.threshold, bandwidth)
            sparsity = l0_coefficient * _Step.apply(pre, transcoder.threshold, bandwidth).sum() / n_tokens
        latents = activations.sparsify_dense(dense.detach())
        y_hat = transcoder.decode(dense) + skip
    error = fvu(y, y_hat, sum_ranks)
    return StepOutput(loss=error + sparsity, fvu=sum_ranks(error.detach()), latents=latents)


def _auxk(
    transcoder: Transcoder, pre: Tensor, dead: Tensor, residual: Tensor, k_aux: int, sum_ranks: SumRanks
) -> Tensor:
    """How well the top `k_aux` dead latents reconstruct the residual error (AuxK)."""
    k_aux = min(k_aux, int(dead.sum()))
    masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    values, indices = masked.topk(k_aux, dim=-1, sorted=False)
    reconstruction = transcoder.decode_sparse(SparseLatents(torch.relu(values), indices)) - transcoder.b_dec
    return fvu(residual, reconstruction, sum_ranks)
