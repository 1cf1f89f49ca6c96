"""Training forward passes and losses, one per activation function.

`training_step(transcoder, x, y, ...)` returns the loss to minimise and the sparse
latents, for a transcoder or a cross-layer transcoder (whose loss sums every
layer's). Every variant minimises FVU (squared error over the batch's variance of the
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

from tl_transcoders.core import activations, kernels
from tl_transcoders.core.activations import SparseLatents
from tl_transcoders.core.clt import CrossLayerTranscoder
from tl_transcoders.core.transcoder import Transcoder
from tl_transcoders.evaluation.statistics import SumRanks, fvu, no_ranks
from tl_transcoders.training.config import TrainConfig

__all__ = ["StepOutput", "training_step"]


@dataclass
class StepOutput:
    """A training step's loss, the global batch's FVU (per covered layer for a
    cross-layer transcoder) and the latents (detached; one per layer for a CLT)."""

    loss: Tensor
    fvu: Tensor
    latents: SparseLatents | list[SparseLatents]


def training_step(
    module: Transcoder | CrossLayerTranscoder,
    x: Tensor,
    y: Tensor,
    dead: Tensor,
    cfg: TrainConfig,
    sum_ranks: SumRanks = no_ranks,
) -> StepOutput:
    """Loss for one batch; the coefficients, the JumpReLU bandwidth and the compute
    dtype come from `cfg`.

    A transcoder maps `x` [n, d_in] to `y` [n, d_out], with `dead` [d_latent] marking
    the latents that have not fired recently (the targets of AuxK); `fvu` in the result
    is the global batch's. A cross-layer transcoder takes `x` and `y` [n_layers, n,
    d_model] (every covered layer's MLP input and output) and `dead` [n_layers,
    d_latent]: its loss is the sum over target layers of each layer's FVU (normalised
    as the per-layer FVU) and the sparsity terms of each source layer's latents; AuxK
    fits each layer's dead latents to its own layer's residual error, through their
    decoders into that layer; `fvu` is `[n_layers]` and `latents` one per layer."""
    auxk = _uses_auxk(module.cfg.activation, cfg, dead)
    run = module.run(x, **_run_options(cfg, auxk))
    per_layer = isinstance(module, Transcoder)
    threshold = getattr(module, "threshold", None)
    if per_layer:  # as a cross-layer transcoder of one layer
        outputs, ys, deads = [run.output], [y], [dead]
        latents, pre, decoders, thresholds = [run.latents], [run.pre_activations], [module.W_dec], [threshold]
    else:
        outputs, ys, deads, latents, pre = run.outputs, y, dead, run.latents, run.pre_activations
        decoders = list(module.W_dec)
        thresholds = [None] * module.cfg.n_layers if threshold is None else list(threshold)
    loss, errors = x.new_zeros(()), []
    for i in range(len(outputs)):
        layer_loss, error = _layer_loss(
            cfg,
            module.cfg.activation,
            outputs[i],
            ys[i],
            latents[i],
            pre[i],
            decoders[i],
            thresholds[i],
            deads[i],
            auxk and bool(deads[i].any()),
            sum_ranks,
        )
        loss = loss + layer_loss
        errors.append(error.detach())
    detached = [SparseLatents(z.values.detach(), z.indices) for z in latents]
    if per_layer:
        return StepOutput(loss=loss, fvu=sum_ranks(errors[0]), latents=detached[0])
    return StepOutput(loss=loss, fvu=sum_ranks(torch.stack(errors)), latents=detached)


def _uses_auxk(activation: str, cfg: TrainConfig, dead: Tensor) -> bool:
    return activation == "topk" and cfg.auxk_alpha > 0 and bool(dead.any())


def _run_options(cfg: TrainConfig, auxk: bool) -> dict:
    """The options of a training forward pass (`run`): pre-activations for AuxK, the
    JumpReLU bandwidth and the compute dtype."""
    return {
        "return_pre_activations": auxk,
        "jumprelu_bandwidth": cfg.jumprelu_bandwidth,
        "compute_dtype": getattr(torch, cfg.compute_dtype) if cfg.compute_dtype else None,
    }


def _layer_loss(
    cfg: TrainConfig,
    activation: str,
    output: Tensor,
    y: Tensor,
    latents: SparseLatents,
    pre: Tensor | None,
    W_dec: Tensor,
    threshold: Tensor | None,
    dead: Tensor,
    auxk: bool,
    sum_ranks: SumRanks,
) -> tuple[Tensor, Tensor]:
    """FVU of one layer's reconstruction `output` of `y` plus its latents' sparsity
    term: AuxK (TopK, where latents are dead), L1 weighted by each latent's decoder norm
    (ReLU; `W_dec` [d_latent, ...] holds its decoders), L0 (JumpReLU). Returns (loss,
    FVU)."""
    n_tokens = sum_ranks(y.new_tensor(float(y.shape[0])))
    output = output.to(y.dtype)
    sparsity = y.new_zeros(())
    if auxk:
        residual = (y - output).detach()
        own_decoder = W_dec if W_dec.ndim == 2 else W_dec[:, 0]
        sparsity = cfg.auxk_alpha * _auxk(own_decoder, pre.to(y.dtype), dead, residual, y.shape[-1] // 2, sum_ranks)
    elif activation == "relu":
        norms = W_dec.flatten(1).norm(dim=-1)[latents.indices]
        sparsity = cfg.l1_coefficient * (latents.values * norms).sum() / n_tokens
    elif activation == "jumprelu":
        active = activations.step(pre, threshold, cfg.jumprelu_bandwidth)
        sparsity = cfg.l0_coefficient * active.sum() / n_tokens
    error = fvu(y, output, sum_ranks)
    return error + sparsity, error


def _auxk(W_dec: Tensor, pre: Tensor, dead: Tensor, residual: Tensor, k_aux: int, sum_ranks: SumRanks) -> Tensor:
    """How well the top `k_aux` dead latents reconstruct the residual error (AuxK),
    through the decoder rows `W_dec` [d_latent, d_out]."""
    k_aux = min(k_aux, int(dead.sum()))
    masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    values, indices = masked.topk(k_aux, dim=-1, sorted=False)
    reconstruction = kernels.sparse_decode(torch.relu(values), indices, W_dec.to(values.dtype), None)
    return fvu(residual, reconstruction, sum_ranks)
