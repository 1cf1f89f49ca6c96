"""`TrainConfig`: every option of a training run (also the command line's option set:
each field is a `--option` of `tl-transcoders train`, its help the docstring under it)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from tl_transcoders.core.config import (
    Activation,
    ConfigError,
    Dtype,
    check_field_types,
    config_from_dict,
    default_input_site,
    default_output_site,
    site_for_layer,
)

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Options of a training run; see docs/training.md for what a step does."""

    layers: list[int]
    """Layers to train a transcoder for, e.g. [6] or list(range(30))."""
    activation: Activation = "topk"
    """Sparsifying activation: topk, batchtopk, relu or jumprelu."""
    k: int = 32
    """Active latents per token (topk exactly, batchtopk on average); at most the number of latents."""
    expansion: int = 16
    """Latents per transcoder as a multiple of the input width (used when d_latent is not set)."""
    d_latent: int | None = None
    """Latents per transcoder (overrides expansion)."""
    skip: bool = True
    """Train skip transcoders (an affine term x @ W_skip.T beside the latents)."""
    sae: bool = False
    """Train SAEs on the output site instead of transcoders (needs skip off)."""
    cross_layer: bool = False
    """Train one cross-layer transcoder over `layers` (consecutive) instead of one
    transcoder per layer: each layer's latents decode into its own MLP output and every
    later one's (saved to `output_dir/cross_layer`)."""
    input_site: str | None = None
    """Input site template with {layer} (default: the MLP's exact input, blocks.{layer}.mlp.hook_in)."""
    output_site: str | None = None
    """Output site template with {layer} (default: blocks.{layer}.hook_mlp_out)."""
    batch_size: int = 32
    """Rows (token sequences) per training step."""
    context_size: int = 128
    """Tokens per row; at most the model's context."""
    max_tokens: int = 1_000_000
    """Training tokens; the run takes max_tokens // (batch_size * context_size) steps."""
    lr: float | None = None
    """Adam learning rate (default: 3e-3 / sqrt(d_latent / 2**14), scaled to the dictionary size as in sparsify)."""
    warmup_steps: int = 1000
    """Linear learning-rate warm-up steps (at most 10% of the run), then linear decay to zero."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss that revives dead TopK latents (0: off)."""
    dead_tokens: int = 1_000_000
    """A latent that has not fired for this many tokens counts as dead (AuxK's targets)."""
    l1_coefficient: float = 1e-3
    """Weight of the L1 penalty (activations times decoder norms) for relu."""
    l0_coefficient: float = 1e-3
    """Weight of the L0 penalty for jumprelu."""
    jumprelu_bandwidth: float = 1e-3
    """Width of the straight-through kernel that gives JumpReLU thresholds a gradient."""
    normalize: bool = True
    """Train on inputs and outputs scaled to unit mean squared norm per dimension; the scales
    are folded back into the saved weights."""
    shuffle_buffer: int = 0
    """Mix the activations of this many batches before training on them (0: off)."""
    log_every: int = 20
    """Steps between metric records (FVU, L0, dead fraction, tokens/s)."""
    eval_every: int = 0
    """Steps between spliced-CE evaluations on the held-out tokens given to fit (0: never)."""
    wandb_project: str | None = None
    """Log metrics to this Weights & Biases project (pip install tl-transcoders[wandb])."""
    checkpoint_every: int = 100
    """Steps between checkpoints (output_dir/checkpoint.pt; the previous one is kept until the new one is whole)."""
    output_dir: str = "transcoders"
    """Directory for the checkpoints, the run record (training.json) and one transcoder per layer (layer_{L})."""
    resume: bool = False
    """Continue the run whose checkpoint is in output_dir; it ends with the same weights as an uninterrupted run."""
    overwrite: bool = False
    """Start afresh in an output_dir that holds an earlier run's checkpoint, replacing it."""
    distribute: Literal["data", "layers"] = "data"
    """Under torchrun: data splits each batch's rows across processes; layers gives each
    process a share of the layers."""
    dtype: Dtype = "float32"
    """Parameter dtype of the transcoders (the optimiser state has the same dtype)."""
    compute_dtype: Literal["bfloat16"] | None = None
    """Mixed precision: run the transcoders' arithmetic in bfloat16 while the parameters and
    Adam's state stay in `dtype` (None: all in `dtype`)."""
    tf32: bool = False
    """Allow TF32 matrix products on CUDA for the run (faster on Ampere and later GPUs, about
    1e-3 relative precision); the setting before the run is restored after it."""
    seed: int = 0
    """Seed of the initialisation and of the shuffle buffer."""

    def __post_init__(self) -> None:
        if isinstance(self.layers, (tuple, range)):
            self.layers = list(self.layers)
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first field of the wrong type or out of range."""
        check_field_types(self)
        if not self.layers or any(layer < 0 for layer in self.layers):
            raise ConfigError(f"layers must be a non-empty list of layer numbers >= 0, got {self.layers!r}")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers has duplicates: {self.layers}")
        positive = ("k", "expansion", "batch_size", "max_tokens", "log_every", "checkpoint_every", "dead_tokens")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        non_negative = (
            "warmup_steps",
            "auxk_alpha",
            "l1_coefficient",
            "l0_coefficient",
            "shuffle_buffer",
            "eval_every",
        )
        for name in non_negative:
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.d_latent is not None and self.d_latent <= 0:
            raise ConfigError(f"d_latent must be positive (or None for expansion x d_in), got {self.d_latent}")
        if self.d_latent is not None and self.activation in ("topk", "batchtopk") and self.k > self.d_latent:
            raise ConfigError(f"k={self.k} is larger than d_latent={self.d_latent}: lower k or raise d_latent")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive finite number (or None for the default), got {self.lr!r}")
        if not (self.jumprelu_bandwidth > 0 and math.isfinite(self.jumprelu_bandwidth)):
            raise ConfigError(f"jumprelu_bandwidth must be positive, got {self.jumprelu_bandwidth!r}")
        if self.context_size < 2:
            raise ConfigError(f"context_size must be at least 2, got {self.context_size}")
        if self.max_tokens < self.tokens_per_step:
            raise ConfigError(
                f"max_tokens={self.max_tokens} is less than one step of batch_size x context_size = "
                f"{self.batch_size} x {self.context_size} tokens"
            )
        if self.sae and self.skip:
            raise ConfigError("an SAE cannot have a skip term: pass skip=False with sae=True")
        if self.cross_layer:
            if self.layers != list(range(self.layers[0], self.layers[0] + len(self.layers))):
                raise ConfigError(f"a cross-layer transcoder covers consecutive layers in order, got {self.layers}")
            if self.sae or self.input_site or self.output_site:
                raise ConfigError(
                    "a cross-layer transcoder reads each MLP's input and writes its output: "
                    "leave sae, input_site and output_site at their defaults"
                )
        if self.resume and self.overwrite:
            raise ConfigError(
                "resume and overwrite exclude each other: resume continues the run, overwrite discards it"
            )
        if not self.output_dir:
            raise ConfigError("output_dir must be a directory path")
        for name in ("input_site", "output_site"):
            template = getattr(self, name)
            if template is not None:
                site_for_layer(template, self.layers[0])
            if template is not None and "{layer}" not in template and len(self.layers) > 1:
                raise ConfigError(
                    f"{name}={template!r} names one site but {len(self.layers)} layers are trained: "
                    "use a template with {layer}, e.g. 'blocks.{layer}.hook_resid_mid'"
                )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context_size

    @property
    def total_steps(self) -> int:
        return max(self.max_tokens // self.tokens_per_step, 1)

    def sites(self, layer: int) -> tuple[str, str]:
        """The input and output site of the transcoder for `layer`."""
        output_site = site_for_layer(self.output_site or default_output_site(layer), layer)
        if self.sae:
            return output_site, output_site
        return site_for_layer(self.input_site or default_input_site(layer), layer), output_site

    def learning_rate(self, d_latent: int) -> float:
        return self.lr if self.lr is not None else 3e-3 / math.sqrt(d_latent / 2**14)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build a config from `to_dict()` output, refusing unknown or missing fields."""
        return config_from_dict(cls, data, "training config")
