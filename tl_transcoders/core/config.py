"""`TranscoderConfig`: the one description of a transcoder.

A transcoder maps the activation at one hook site (its *input site*, by default the
exact input of a layer's MLP) to the activation at another (its *output site*, by
default that layer's `hook_mlp_out`). The config records everything needed to splice
it back into the right place of the right model: the layer, both site names, the
input space (whether the model's layer-norm weights were folded when it was trained)
and the model's name. An SAE is a transcoder whose input and output sites are equal.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

ACTIVATIONS = ("topk", "batchtopk", "relu", "jumprelu")
"""Supported activation functions. `topk` and `batchtopk` need `k`."""

INPUT_SPACES = ("folded_ln", "unfolded_ln", "no_ln", "any")
"""Input spaces a transcoder can be trained in.

- `folded_ln`: the model's layer-norm weights are folded into the following linear
  layer (HookedTransformer's `from_pretrained` default, the Bridge's compatibility
  mode), so the MLP input is the normalised vector before any affine step.
- `unfolded_ln`: the weights are not folded (`from_pretrained_no_processing`, a Bridge
  without compatibility mode): the MLP input includes the norm's weight and bias.
- `no_ln`: the model has no normalisation layers.
- `any`: the input site reads the same values in every space (e.g.
  `ln2.hook_normalized`, taken before the affine step).
"""

DTYPES = ("float32", "float64", "float16", "bfloat16")


def default_input_site(layer: int) -> str:
    """The exact input of layer `layer`'s MLP."""
    return f"blocks.{layer}.mlp.hook_in"


def default_output_site(layer: int) -> str:
    """What layer `layer`'s MLP adds to the residual stream."""
    return f"blocks.{layer}.hook_mlp_out"


_LAYER = re.compile(r"^blocks\.(\d+)\.")


def layer_of(site: str) -> int | None:
    """The block index in a site name (`blocks.L....`), or None for sites outside blocks."""
    match = _LAYER.match(site)
    return int(match.group(1)) if match else None


class ConfigError(ValueError):
    """A transcoder config (or a file's config) has a missing, unknown or bad field."""


@dataclass
class TranscoderConfig:
    """Shape, sparsity rule and placement of a transcoder.

    Attributes:
        d_in: width of the input site's activation (d_model for the MLP input).
        d_out: width of the output site's activation (d_model for `hook_mlp_out`).
        d_latent: number of latents (dictionary size).
        layer: the transformer layer whose MLP this transcoder replaces.
        activation: one of `ACTIVATIONS`.
        k: active latents per token for `topk` (exact) and `batchtopk` (on average
            over a batch); ignored by `relu` and `jumprelu`.
        skip: add the affine skip term `x @ W_skip.T` (a skip transcoder).
        input_site: hook name read; default `blocks.{layer}.mlp.hook_in`.
        output_site: hook name written; default `blocks.{layer}.hook_mlp_out`.
        input_space: one of `INPUT_SPACES`, or None when unknown (splice then warns
            because it cannot check the space).
        model_name: the model the transcoder was trained on, or None when unknown.
        dtype: parameter dtype name.
    """

    d_in: int
    d_out: int
    d_latent: int
    layer: int
    activation: str = "topk"
    k: int | None = 32
    skip: bool = False
    input_site: str | None = None
    output_site: str | None = None
    input_space: str | None = None
    model_name: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.input_site is None:
            self.input_site = default_input_site(self.layer)
        if self.output_site is None:
            self.output_site = default_output_site(self.layer)
        self.validate()

    @property
    def is_sae(self) -> bool:
        """True when the transcoder reads and writes the same site (an SAE)."""
        return self.input_site == self.output_site

    @property
    def uses_k(self) -> bool:
        """True for the TopK-style activations, whose sparsity is set by `k`."""
        return self.activation in ("topk", "batchtopk")

    def validate(self) -> None:
        """Raise `ConfigError` naming the first field that is out of range."""
        for name in ("d_in", "d_out", "d_latent"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise ConfigError(f"layer must be a non-negative integer, got {self.layer!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"activation must be one of {ACTIVATIONS}, got {self.activation!r}"
            )
        if self.uses_k:
            if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k <= 0:
                raise ConfigError(
                    f"activation {self.activation!r} needs k, a positive integer; got {self.k!r}"
                )
            if self.k > self.d_latent:
                raise ConfigError(f"k={self.k} is larger than d_latent={self.d_latent}")
        if not isinstance(self.skip, bool):
            raise ConfigError(f"skip must be True or False, got {self.skip!r}")
        for name in ("input_site", "output_site"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{name} must be a non-empty hook name, got {value!r}")
        if self.skip and self.is_sae:
            raise ConfigError(
                "an SAE (input_site == output_site) cannot have a skip term: "
                "the skip would let it copy its input"
            )
        if self.input_space is not None and self.input_space not in INPUT_SPACES:
            raise ConfigError(
                f"input_space must be one of {INPUT_SPACES} or None, got {self.input_space!r}"
            )
        if self.model_name is not None and not isinstance(self.model_name, str):
            raise ConfigError(f"model_name must be a string or None, got {self.model_name!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TranscoderConfig:
        """Build a config from `to_dict()` output, refusing unknown or missing fields."""
        if not isinstance(data, dict):
            raise ConfigError(f"a transcoder config must be a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(fields)}")
        required = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise ConfigError(f"config is missing required field(s) {missing}")
        # Fill the fields directly rather than through the generated __init__, so that
        # a wrong type in a file reaches validate() and its ConfigError, whatever
        # runtime type checker may wrap __init__.
        config = cls.__new__(cls)
        for name, f in fields.items():
            config.__dict__[name] = data.get(name, f.default)
        config.__post_init__()
        return config
