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
    n_tokens = sum_ranks(x.new_tensor(float(x.shape[0])))
    auxk = cfg.activation == "topk" and auxk_alpha > 0 and bool(dead.any())
    out = transcoder.run(x, return_pre_activations=auxk, jumprelu_bandwidth=bandwidth)
    latents = out.latents
    sparsity = x.new_zeros(())
    if auxk:
        residual = (y - out.output).detach()
        sparsity = auxk_alpha * _auxk(transcoder, out.pre_activations, dead, residual, x.shape[-1] // 2, sum_ranks)
    elif cfg.activation == "relu":
        norms = transcoder.W_dec.norm(dim=-1)[latents.indices]
        sparsity = l1_coefficient * (latents.values * norms).sum() / n_tokens
    elif cfg.activation == "jumprelu":
        active = activations.step(out.pre_activations, transcoder.threshold, bandwidth)
        sparsity = l0_coefficient * active.sum() / n_tokens
    error = fvu(y, out.output, sum_ranks)
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
