"""`CrossLayerTranscoder`: one encoder per layer, decoders into that layer and every later one.

For covered layers l = first_layer .. first_layer + n_layers - 1 (index i = l - first_layer):

    latents_i = activation(x_i @ W_enc[i].T + b_enc[i])              [..., d_latent]
    output_t  = b_dec[t] + sum_{i <= t} latents_i @ W_dec[i][:, t - i]
                (+ x_t @ W_skip[t].T if skip)                         [..., d_model]

where x_i is layer l's MLP input and output_t the reconstruction of layer t's MLP
output. A feature copied across layers is one latent with several decoders, instead of
a chain of per-layer latents.

Each encoder and decoder runs through `encoder.py`, the forward pass shared with
`Transcoder`: TopK (and BatchTopK across the batch, in training mode) with the sparse
kernels, whose backward touches only the active latents' decoder rows. Layer i's
decoders are one `[d_latent, n_layers - i, d_model]` tensor, decoded as one
`[d_latent, (n_layers - i) * d_model]` matrix.

`step` computes one layer at a time (what a spliced forward pass needs, where layer l's
input depends on the reconstructions of the layers before it); `run` steps through all
layers of given inputs. Saved and loaded in the native format (kind
`cross_layer_transcoder`), as `Transcoder` is.
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
from tl_transcoders.core.config import ConfigError, CrossLayerConfig
from tl_transcoders.core.encoder import EncoderWeights
from tl_transcoders.core.errors import TensorInputError
from tl_transcoders.core.module import NativeModule

__all__ = ["CrossLayerOutput", "CrossLayerTranscoder", "LayerTargets", "cross_layer_shapes"]


def cross_layer_shapes(cfg: CrossLayerConfig) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor a cross-layer transcoder with this config holds."""
    n, d, m = cfg.n_layers, cfg.d_latent, cfg.d_model
    shapes = {"W_enc": (n, d, m), "b_enc": (n, d), "b_dec": (n, m)}
    shapes.update({f"W_dec.{i}": (d, n - i, m) for i in range(n)})
    if cfg.skip:
        shapes["W_skip"] = (n, m, m)
    if cfg.activation in ("jumprelu", "batchtopk"):
        shapes["threshold"] = (n, d)
    return shapes


class CrossLayerOutput(NamedTuple):
    """What `CrossLayerTranscoder.run` computed: the reconstructions of every covered
    layer's MLP output, and per layer the active latents (None when not asked for) and
    the dense pre-activations (where computed or asked for, else None)."""

    outputs: Float[Tensor, "n_layers *batch d_model"]
    latents: list[SparseLatents | None]
    pre_activations: list[Float[Tensor, "*batch d_latent"] | None]


class LayerTargets:
    """The decoded contributions of the layers stepped so far to the layers not yet
    reconstructed: one running sum per target layer, released when that layer is read
    (memory: one `[*batch, d_model]` tensor per covered layer)."""

    def __init__(self, n_layers: int):
        self.sums: list[Tensor | None] = [None] * n_layers

    def add(self, source: int, decoded: Float[Tensor, "*batch n_targets d_model"]) -> None:
        """Add source layer `source`'s decoded outputs, `[..., n_layers - source, d_model]`."""
        # unbind: one backward node that stacks the slices' gradients, where a slice per
        # target would fill a zero gradient of the whole tensor for each. The sums grow in
        # place: a new tensor per (source, target) pair made the C allocator keep several
        # GB it had freed (on 30 layers, 435 tensors a step, each freed one step later).
        for offset, contribution in enumerate(decoded.unbind(-2)):
            total = self.sums[source + offset]
            if total is None:
                self.sums[source + offset] = contribution.clone()
            else:
                total.add_(contribution)

    def pop(self, target: int) -> Tensor:
        """The summed contributions to layer `target` (every source up to it)."""
        total, self.sums[target] = self.sums[target], None
        if total is None:
            raise RuntimeError(f"layer index {target} was read before any layer up to it was stepped")
        return total


class CrossLayerTranscoder(NativeModule):
    """A cross-layer transcoder over `cfg.layers` (see the module docstring).

    Parameters: `W_enc` [n_layers, d_latent, d_model], `b_enc` [n_layers, d_latent],
    `W_dec` (a list: `W_dec[i]` is [d_latent, n_layers - i, d_model], layer i's decoders
    into layers i, i + 1, ...), `b_dec` [n_layers, d_model]; `W_skip` [n_layers, d_model,
    d_model] when `cfg.skip`; `threshold` [n_layers, d_latent] for JumpReLU and BatchTopK.
    A new one has random decoders of unit norm per latent (over all its targets), an
    encoder of matching scale and zeros elsewhere, on `device`. Indices `i` are positions
    in `cfg.layers` (layer `cfg.first_layer + i`).

    BatchTopK selects across the batch in training mode and thresholds each token in
    eval mode; `load` returns the module in eval mode.
    """

    KIND = "cross_layer_transcoder"
    CONFIG = CrossLayerConfig
    shapes_of = staticmethod(cross_layer_shapes)

    def __init__(self, cfg: CrossLayerConfig | Mapping[str, Any], device: str | torch.device | None = None):
        super().__init__()
        self.cfg = cfg = self.checked_config(cfg)
        n, d, m = cfg.n_layers, cfg.d_latent, cfg.d_model
        factory = {"dtype": getattr(torch, cfg.dtype), "device": device}
        decoders = []
        for i in range(n):
            W = torch.randn(d, n - i, m, **factory)
            decoders.append(nn.Parameter(W / W.flatten(1).norm(dim=-1)[:, None, None]))
        self.W_dec = nn.ParameterList(decoders)
        self.W_enc = nn.Parameter(torch.randn(n, d, m, **factory) / math.sqrt(m))
        self.b_enc = nn.Parameter(torch.zeros(n, d, **factory))
        self.b_dec = nn.Parameter(torch.zeros(n, m, **factory))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(n, m, m, **factory))
        if "threshold" in cross_layer_shapes(cfg):
            self.threshold = nn.Parameter(torch.zeros(n, d, **factory))

    @property
    def layers(self) -> range:
        """The covered layers."""
        return self.cfg.layers

    def index_of(self, layer: int) -> int:
        """Position of `layer` in `cfg.layers`; `ConfigError` for a layer not covered."""
        if layer not in self.cfg.layers:
            raise ConfigError(
                f"layer {layer} is not covered by this cross-layer transcoder (layers "
                f"{self.cfg.first_layer}..{self.cfg.layers[-1]})"
            )
        return layer - self.cfg.first_layer

    def _check_index(self, i: int) -> None:
        """Refuse a layer index outside 0..n_layers-1 (a negative one would silently
        count from the end)."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.cfg.n_layers:
            raise ConfigError(
                f"layer index {i!r} is out of range: indices count the covered layers from 0 to "
                f"{self.cfg.n_layers - 1} (layer = {self.cfg.first_layer} + index; index_of(layer) converts)"
            )

    def encoder_weights(self, i: int, dtype: torch.dtype | None = None) -> EncoderWeights:
        """Layer index `i`'s encoder tensors (cast differentiably to `dtype` when given).
        Refuses a config or a parameter changed after construction (`check_unchanged`)."""
        self.check_unchanged()
        self._check_index(i)
        threshold = getattr(self, "threshold", None)
        weights = EncoderWeights(self.W_enc[i], self.b_enc[i], None if threshold is None else threshold[i])
        return weights if dtype is None else EncoderWeights(*(t if t is None else t.to(dtype) for t in weights))

    def encode_layer(
        self,
        i: int,
        x: Float[Tensor, "*batch d_model"],
        *,
        jumprelu_bandwidth: float | None = None,
        return_latents: bool = True,
        return_pre_activations: bool = False,
        compute_dtype: torch.dtype | None = None,
    ) -> encoder.Encoded:
        """Layer index `i`'s latents from its MLP input `x` (`encoder.encode`)."""
        return encoder.encode(
            x if compute_dtype is None else x.to(compute_dtype),
            self.encoder_weights(i, compute_dtype),
            self.cfg.activation,
            self.cfg.k,
            batch_wide=self.training,
            jumprelu_bandwidth=jumprelu_bandwidth,
            return_latents=return_latents,
            return_pre_activations=return_pre_activations,
        )

    def decode_layer(
        self, i: int, encoded: encoder.Encoded, compute_dtype: torch.dtype | None = None
    ) -> Float[Tensor, "*batch n_targets d_model"]:
        """Layer index `i`'s latents decoded into layers i, i + 1, ... (no bias)."""
        self._check_index(i)
        W = self.W_dec[i] if compute_dtype is None else self.W_dec[i].to(compute_dtype)
        flat = encoder.decode(encoded, W.flatten(1), None)
        return flat.unflatten(-1, (W.shape[1], W.shape[2]))

    def step(
        self,
        i: int,
        x: Float[Tensor, "*batch d_model"],
        targets: LayerTargets,
        *,
        compute_dtype: torch.dtype | None = None,
        **options,
    ) -> tuple[Float[Tensor, "*batch d_model"], encoder.Encoded]:
        """Encode layer index `i` from its MLP input `x`, add its decoded contributions
        to `targets` (which holds those of the layers stepped before), and return layer
        i's reconstruction with its encoding. `options` go to `encode_layer`."""
        encoded = self.encode_layer(i, x, compute_dtype=compute_dtype, **options)
        targets.add(i, self.decode_layer(i, encoded, compute_dtype))
        b_dec = self.b_dec[i] if compute_dtype is None else self.b_dec[i].to(compute_dtype)
        output = targets.pop(i) + b_dec
        if self.cfg.skip:
            W_skip = self.W_skip[i] if compute_dtype is None else self.W_skip[i].to(compute_dtype)
            output = output + x.to(W_skip.dtype) @ W_skip.T
        return output, encoded

    def run(
        self,
        inputs: Float[Tensor, "n_layers *batch d_model"],
        *,
        return_latents: bool = True,
        return_pre_activations: bool = False,
        jumprelu_bandwidth: float | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> CrossLayerOutput:
        """Reconstruct every covered layer's MLP output from all their MLP inputs
        (`inputs[i]` is layer index i's), for training and inference alike; the options
        are `Transcoder.run`'s."""
        if inputs.ndim < 2 or inputs.shape[0] != self.cfg.n_layers or inputs.shape[-1] != self.cfg.d_model:
            raise TensorInputError(
                f"inputs must be [n_layers={self.cfg.n_layers}, ..., d_model={self.cfg.d_model}] "
                f"(one MLP input per covered layer), got {list(inputs.shape)}"
            )
        targets = LayerTargets(self.cfg.n_layers)
        outputs, latents, pre = [], [], []
        for i in range(self.cfg.n_layers):
            output, encoded = self.step(
                i,
                inputs[i],
                targets,
                compute_dtype=compute_dtype,
                jumprelu_bandwidth=jumprelu_bandwidth,
                return_latents=return_latents,
                return_pre_activations=return_pre_activations,
            )
            outputs.append(output)
            latents.append(encoded.latents if return_latents else None)
            pre.append(encoded.pre_activations)
        return CrossLayerOutput(torch.stack(outputs), latents, pre)

    def forward(self, inputs: Float[Tensor, "n_layers *batch d_model"]) -> Float[Tensor, "n_layers *batch d_model"]:
        """Every covered layer's reconstruction from all covered layers' MLP inputs."""
        return self.run(inputs, return_latents=False).outputs

    def encode(self, layer: int, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_latent"]:
        """Dense latent activations of layer `layer` (a layer number) from its MLP input."""
        encoded = self.encode_layer(self.index_of(layer), x, return_latents=False)
        return encoded.dense if encoded.dense is not None else encoded.latents.to_dense(self.cfg.d_latent)

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.uses_k else ""
        return (
            f"layers={c.first_layer}..{c.layers[-1]}, d_model={c.d_model}, d_latent={c.d_latent} per layer, "
            f"{c.activation}{k}, skip={c.skip}"
        )
