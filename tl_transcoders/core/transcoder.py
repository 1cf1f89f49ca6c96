"""`Transcoder`: a sparse, wide replacement for a transformer MLP.

    latents = activation(x @ W_enc.T + b_enc)                   [..., d_latent]
    output  = latents @ W_dec + b_dec (+ x @ W_skip.T if skip)  [..., d_out]

An SAE is the same module with input site == output site and no skip term.

`Transcoder.run` is the one forward pass, for training and inference alike: it returns
the output, the active latents and, where the loss needs them, the dense
pre-activations (`TranscoderOutput`). It encodes and decodes through `encoder.py`
(shared with the cross-layer transcoder): TopK, and BatchTopK in training mode, go
through the sparse kernels; ReLU, JumpReLU and BatchTopK at inference are computed
densely. `forward` is `run(x).output`.

Weights are saved in the native format (`native.py`): a directory with safetensors and a
JSON config carrying a format version and a checksum, replaced atomically as a whole;
`load` checks every field and tensor before building the module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_transcoders.core import encoder
from tl_transcoders.core.activations import SparseLatents
from tl_transcoders.core.config import TranscoderConfig
from tl_transcoders.core.encoder import EncoderWeights
from tl_transcoders.core.module import NativeModule

__all__ = ["Transcoder", "TranscoderOutput", "Weights", "parameter_shapes"]


def parameter_shapes(cfg: TranscoderConfig) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor a transcoder with this config holds."""
    shapes = {
        "W_enc": (cfg.d_latent, cfg.d_in),
        "b_enc": (cfg.d_latent,),
        "W_dec": (cfg.d_latent, cfg.d_out),
        "b_dec": (cfg.d_out,),
    }
    if cfg.skip:
        shapes["W_skip"] = (cfg.d_out, cfg.d_in)
    if cfg.activation in ("jumprelu", "batchtopk"):
        shapes["threshold"] = (cfg.d_latent,)
    return shapes


class Weights(NamedTuple):
    """A transcoder's tensors as the forward pass uses them (`Transcoder.weights`);
    `W_skip` and `threshold` are None where the config has none."""

    W_enc: Float[Tensor, "d_latent d_in"]
    b_enc: Float[Tensor, " d_latent"]
    W_dec: Float[Tensor, "d_latent d_out"]
    b_dec: Float[Tensor, " d_out"]
    W_skip: Float[Tensor, "d_out d_in"] | None
    threshold: Float[Tensor, " d_latent"] | None


class TranscoderOutput(NamedTuple):
    """What `Transcoder.run` computed.

    `output` is the reconstruction of the output site; `latents` the active latents in
    sparse form (values keep their gradient; None when not asked for); `pre_activations`
    the dense encoder pre-activations `x @ W_enc.T + b_enc`, where they were computed
    (the dense activations) or asked for (AuxK), else None."""

    output: Float[Tensor, "*batch d_out"]
    latents: SparseLatents | None
    pre_activations: Float[Tensor, "*batch d_latent"] | None


class Transcoder(NativeModule):
    """Maps the activation at `cfg.input_site` to the activation at `cfg.output_site`.

    Parameters: `W_enc` [d_latent, d_in], `b_enc` [d_latent], `W_dec` [d_latent, d_out],
    `b_dec` [d_out]; `W_skip` [d_out, d_in] when `cfg.skip`; `threshold` [d_latent] for
    JumpReLU (learned) and BatchTopK (the inference threshold). A new transcoder has
    random unit-norm decoder rows, an encoder of matching scale, zero biases, zero
    skip and zero thresholds, on `device` (default: torch's default device). Row i of
    `W_enc` and of `W_dec` belong to latent i (the layout of sparsify and
    circuit-tracer), so sparse kernels gather contiguous rows.

    `cfg` may also be a mapping of config fields (`TranscoderConfig.to_dict()`).
    BatchTopK selects across the batch in training mode and thresholds each token
    independently in eval mode (`transcoder.eval()`).
    """

    KIND = "transcoder"
    CONFIG = TranscoderConfig
    shapes_of = staticmethod(parameter_shapes)

    def __init__(self, cfg: TranscoderConfig | Mapping[str, Any], device: str | torch.device | None = None):
        super().__init__()
        self.cfg = cfg = self.checked_config(cfg)
        factory = {"dtype": getattr(torch, cfg.dtype), "device": device}
        W_dec = torch.randn(cfg.d_latent, cfg.d_out, **factory)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(torch.randn(cfg.d_latent, cfg.d_in, **factory) / math.sqrt(cfg.d_in))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_latent, **factory))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, **factory))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in, **factory))
        if "threshold" in parameter_shapes(cfg):
            self.threshold = nn.Parameter(torch.zeros(cfg.d_latent, **factory))

    def weights(self, dtype: torch.dtype | None = None) -> Weights:
        """The parameters as used by the forward pass; cast (differentiably, so gradients
        reach the parameters in their own dtype) to `dtype` when given. Refuses a config
        or a parameter changed after construction (`check_unchanged`)."""
        self.check_unchanged()

        def cast(p: Tensor | None) -> Tensor | None:
            return p if p is None or dtype is None else p.to(dtype)

        return Weights(*(cast(getattr(self, name, None)) for name in Weights._fields))

    def encoder_weights(self, w: Weights | None = None) -> EncoderWeights:
        """The encoder's tensors (of `w`, default the parameters)."""
        w = w or self.weights()
        return EncoderWeights(w.W_enc, w.b_enc, w.threshold)

    def pre_activations(
        self, x: Float[Tensor, "*batch d_in"], weights: Weights | None = None
    ) -> Float[Tensor, "*batch d_latent"]:
        """Encoder pre-activations `x @ W_enc.T + b_enc`."""
        return encoder.pre_activations(x, self.encoder_weights(weights))

    def _encode(self, x: Tensor, w: Weights, **options) -> encoder.Encoded:
        """`encoder.encode` with this transcoder's activation; BatchTopK selects across
        the batch in training mode."""
        return encoder.encode(
            x, self.encoder_weights(w), self.cfg.activation, self.cfg.k, batch_wide=self.training, **options
        )

    def run(
        self,
        x: Float[Tensor, "*batch d_in"],
        *,
        return_latents: bool = True,
        return_pre_activations: bool = False,
        jumprelu_bandwidth: float | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> TranscoderOutput:
        """The forward pass (see the module docstring): the reconstruction of the output
        site from `x`, with the active latents (`return_latents`) and the dense
        pre-activations (`return_pre_activations`, or wherever they are computed anyway).
        `jumprelu_bandwidth` turns on JumpReLU's straight-through threshold gradient
        (training). With `compute_dtype` (e.g. bfloat16) the arithmetic runs in that dtype
        on cast copies of `x` and the parameters, whose gradients still reach the
        parameters in their own dtype (mixed precision with full-precision weights)."""
        w = self.weights(compute_dtype)
        if compute_dtype is not None:
            x = x.to(compute_dtype)
        encoded = self._encode(
            x,
            w,
            jumprelu_bandwidth=jumprelu_bandwidth,
            return_latents=return_latents,
            return_pre_activations=return_pre_activations,
        )
        output = encoder.decode(encoded, w.W_dec, w.b_dec)
        if self.cfg.skip:
            output = output + x @ w.W_skip.T
        return TranscoderOutput(output, encoded.latents if return_latents else None, encoded.pre_activations)

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        """The transcoder's reconstruction of the output site from the input site."""
        return self.run(x, return_latents=False).output

    def forward_with_latents(
        self, x: Float[Tensor, "*batch d_in"]
    ) -> tuple[Float[Tensor, "*batch d_out"], SparseLatents]:
        """`forward(x)` together with the sparse latents it was decoded from, computed
        once (for metrics such as L0 next to the output)."""
        out = self.run(x)
        return out.output, out.latents

    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_latent"]:
        """Dense latent activations (mostly zeros)."""
        encoded = self._encode(x, self.weights(), return_latents=False)
        return encoded.dense if encoded.dense is not None else encoded.latents.to_dense(self.cfg.d_latent)

    def encode_sparse(self, x: Float[Tensor, "*batch d_in"]) -> SparseLatents:
        """Values and indices of each token's active latents: exactly k per token for
        TopK; for the other activations padded with zeros to the largest number of
        active latents of any token."""
        return self._encode(x, self.weights()).latents

    def decode(
        self, latents: Float[Tensor, "*batch d_latent"], weights: Weights | None = None
    ) -> Float[Tensor, "*batch d_out"]:
        """`latents @ W_dec + b_dec` (without the skip term, which needs the input)."""
        w = weights or self.weights()
        return encoder.decode(encoder.Encoded(None, latents, None), w.W_dec, w.b_dec)

    def decode_sparse(self, latents: SparseLatents, weights: Weights | None = None) -> Float[Tensor, "*batch d_out"]:
        """Decode from the sparse form: a gather-and-sum of the active decoder rows."""
        w = weights or self.weights()
        return encoder.decode(encoder.Encoded(latents, None, None), w.W_dec, w.b_dec)

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.uses_k else ""
        return (
            f"layer={c.layer}, {c.input_site} -> {c.output_site}, d_in={c.d_in}, "
            f"d_latent={c.d_latent}, d_out={c.d_out}, {c.activation}{k}, skip={c.skip}"
        )
