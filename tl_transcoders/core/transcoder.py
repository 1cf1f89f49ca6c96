"""`Transcoder`: a sparse, wide replacement for a transformer MLP.

    latents = activation(x @ W_enc.T + b_enc)                   [..., d_latent]
    output  = latents @ W_dec + b_dec (+ x @ W_skip.T if skip)  [..., d_out]

An SAE is the same module with input site == output site and no skip term. Weights
are saved as safetensors next to a JSON config carrying a format version; `load`
checks every field and tensor before building the module.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor, nn

from tl_transcoders.core import activations
from tl_transcoders.core.activations import SparseLatents
from tl_transcoders.core.config import TranscoderConfig
from tl_transcoders.core.files import atomic_write
from tl_transcoders.core.native import (
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    read_config,
    read_tensors,
)

__all__ = ["Transcoder", "parameter_shapes"]


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


class Transcoder(nn.Module):
    """Maps the activation at `cfg.input_site` to the activation at `cfg.output_site`.

    Parameters: `W_enc` [d_latent, d_in], `b_enc` [d_latent], `W_dec` [d_latent, d_out],
    `b_dec` [d_out]; `W_skip` [d_out, d_in] when `cfg.skip`; `threshold` [d_latent] for
    JumpReLU (learned) and BatchTopK (the inference threshold). A new transcoder has
    random unit-norm decoder rows, an encoder of matching scale, zero biases, zero
    skip and zero thresholds. Row i of `W_enc` and of `W_dec` belong to latent i (the
    layout of sparsify and circuit-tracer), so sparse kernels gather contiguous rows.

    BatchTopK selects across the batch in training mode and thresholds each token
    independently in eval mode (`transcoder.eval()`).
    """

    def __init__(self, cfg: TranscoderConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        W_dec = torch.randn(cfg.d_latent, cfg.d_out, dtype=dtype)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        W_enc = torch.randn(cfg.d_latent, cfg.d_in, dtype=dtype) / math.sqrt(cfg.d_in)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_latent, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, dtype=dtype))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in, dtype=dtype))
        if "threshold" in parameter_shapes(cfg):
            self.threshold = nn.Parameter(torch.zeros(cfg.d_latent, dtype=dtype))

    def pre_activations(
        self, x: Float[Tensor, "*batch d_in"]
    ) -> Float[Tensor, "*batch d_latent"]:
        """Encoder pre-activations `x @ W_enc.T + b_enc`."""
        return F.linear(x, self.W_enc, self.b_enc)

    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_latent"]:
        """Dense latent activations (mostly zeros)."""
        pre = self.pre_activations(x)
        kind = self.cfg.activation
        if kind == "topk":
            return activations.topk(pre, self.cfg.k).to_dense(self.cfg.d_latent)
        if kind == "batchtopk" and self.training:
            return activations.batchtopk(pre, self.cfg.k)
        if kind == "relu":
            return activations.relu(pre)
        return activations.jumprelu(pre, self.threshold)

    def encode_sparse(self, x: Float[Tensor, "*batch d_in"]) -> SparseLatents:
        """Values and indices of each token's active latents.

        For TopK this is computed directly (exactly k per token); for the other
        activations it is derived from `encode` and padded with zeros to the largest
        number of active latents of any token."""
        if self.cfg.activation == "topk":
            return activations.topk(self.pre_activations(x), self.cfg.k)
        return activations.sparsify_dense(self.encode(x))

    def decode(self, latents: Float[Tensor, "*batch d_latent"]) -> Float[Tensor, "*batch d_out"]:
        """`latents @ W_dec + b_dec` (without the skip term, which needs the input)."""
        return latents @ self.W_dec + self.b_dec

    def decode_sparse(self, latents: SparseLatents) -> Float[Tensor, "*batch d_out"]:
        """Decode from the sparse form: a gather-and-sum of the active decoder rows."""
        values, indices = latents
        k = indices.shape[-1]
        out = F.embedding_bag(
            indices.reshape(-1, k),
            self.W_dec,
            per_sample_weights=values.reshape(-1, k).to(self.W_dec.dtype),
            mode="sum",
        )
        return out.view(*indices.shape[:-1], self.cfg.d_out) + self.b_dec

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        """The transcoder's reconstruction of the output site from the input site."""
        if self.cfg.activation == "topk":
            return self.forward_with_latents(x)[0]
        return self._add_skip(self.decode(self.encode(x)), x)

    def forward_with_latents(
        self, x: Float[Tensor, "*batch d_in"]
    ) -> tuple[Float[Tensor, "*batch d_out"], SparseLatents]:
        """`forward(x)` together with the sparse latents it was decoded from, computed
        once (for metrics such as L0 next to the output)."""
        latents = self.encode_sparse(x)
        return self._add_skip(self.decode_sparse(latents), x), latents

    def _add_skip(self, out: Tensor, x: Tensor) -> Tensor:
        return out + x @ self.W_skip.T if self.cfg.skip else out

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.uses_k else ""
        return (
            f"layer={c.layer}, {c.input_site} -> {c.output_site}, d_in={c.d_in}, "
            f"d_latent={c.d_latent}, d_out={c.d_out}, {c.activation}{k}, skip={c.skip}"
        )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `config.json` and `transcoder.safetensors` into `directory`.

        Each file is written to a temporary name and renamed into place, so an
        interrupted save never leaves a half-written file under the final name."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().cpu().contiguous() for name, p in self.state_dict().items()}
        header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": self.cfg.to_dict()}
        atomic_write(directory / WEIGHTS_FILE, lambda path: save_file(tensors, path))
        atomic_write(
            directory / CONFIG_FILE,
            lambda path: Path(path).write_text(json.dumps(header, indent=2) + "\n"),
        )
        return directory

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> Transcoder:
        """Read a transcoder written by `save`, checking every field and tensor.

        Raises `TranscoderFileError` naming the file and the problem for a missing or
        corrupt file, an unknown format or version, a bad config field, or a tensor
        that is missing, unexpected, of the wrong shape or not finite."""
        directory = Path(directory)
        cfg = read_config(directory / CONFIG_FILE)
        if dtype is not None:
            cfg.dtype = str(dtype).removeprefix("torch.")
            cfg.validate()
        tensors = read_tensors(directory / WEIGHTS_FILE, parameter_shapes(cfg))
        transcoder = cls(cfg)
        transcoder.load_state_dict(tensors)
        return transcoder.to(device) if device is not None else transcoder
