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

from dataclasses import dataclass

import torch
from torch import Tensor

from tl_transcoders.core import activations
from tl_transcoders.core.activations import SparseLatents
from tl_transcoders.core.transcoder import Transcoder
from tl_transcoders.evaluation.statistics import SumRanks, fvu, no_ranks
from tl_transcoders.training.config import TrainConfig

__all__ = ["StepOutput", "training_step"]


@dataclass
class StepOutput:
    loss: Tensor
    fvu: Tensor
    latents: SparseLatents


def training_step(
    transcoder: Transcoder,
    x: Tensor,
    y: Tensor,
    dead: Tensor,
    cfg: TrainConfig,
    sum_ranks: SumRanks = no_ranks,
) -> StepOutput:
    """Loss for one batch: `x` [n, d_in] -> `y` [n, d_out]; `dead` [d_latent] marks
    latents that have not fired recently (the targets of AuxK); the coefficients, the
    JumpReLU bandwidth and the compute dtype come from `cfg`. `fvu` in the result is the
    global batch's."""
    activation = transcoder.cfg.activation
    n_tokens = sum_ranks(x.new_tensor(float(x.shape[0])))
    auxk = activation == "topk" and cfg.auxk_alpha > 0 and bool(dead.any())
    compute_dtype = getattr(torch, cfg.compute_dtype) if cfg.compute_dtype else None
    out = transcoder.run(
        x, return_pre_activations=auxk, jumprelu_bandwidth=cfg.jumprelu_bandwidth, compute_dtype=compute_dtype
    )
    output = out.output.to(y.dtype)
    latents = out.latents
    sparsity = x.new_zeros(())
    if auxk:
        residual = (y - output).detach()
        pre = out.pre_activations.to(y.dtype)
        sparsity = cfg.auxk_alpha * _auxk(transcoder, pre, dead, residual, x.shape[-1] // 2, sum_ranks)
    elif activation == "relu":
        norms = transcoder.W_dec.norm(dim=-1)[latents.indices]
        sparsity = cfg.l1_coefficient * (latents.values * norms).sum() / n_tokens
    elif activation == "jumprelu":
        active = activations.step(out.pre_activations, transcoder.threshold, cfg.jumprelu_bandwidth)
        sparsity = cfg.l0_coefficient * active.sum() / n_tokens
    error = fvu(y, output, sum_ranks)
    detached = SparseLatents(latents.values.detach(), latents.indices)
    return StepOutput(loss=error + sparsity, fvu=sum_ranks(error.detach()), latents=detached)


def _auxk(
    transcoder: Transcoder, pre: Tensor, dead: Tensor, residual: Tensor, k_aux: int, sum_ranks: SumRanks
) -> Tensor:
    """How well the top `k_aux` dead latents reconstruct the residual error (AuxK)."""
    k_aux = min(k_aux, int(dead.sum()))
    masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    values, indices = masked.topk(k_aux, dim=-1, sorted=False)
    reconstruction = transcoder.decode_sparse(SparseLatents(torch.relu(values), indices)) - transcoder.b_dec
    return fvu(residual, reconstruction, sum_ranks)
