"""`TranscoderConfig`: the one description of a transcoder, and what every config shares.

A transcoder maps the activation at one hook site (its *input site*, by default the
exact input of a layer's MLP) to the activation at another (its *output site*, by
default that layer's `hook_mlp_out`). The config records everything needed to splice
it back into the right place of the right model: the layer, both site names, the
input space (whether the model's layer-norm weights were folded when it was trained)
and the model's name. An SAE is a transcoder whose input and output sites are equal.

Configs document each field in a docstring under it (`field_docs` reads them: the
command line's help comes from there), check every field's type from its annotation
and its range when built (`validate`), and are checked again where they are used, so a
config changed after construction cannot slip through.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from tl_transcoders.core.errors import TranscodersError

__all__ = [
    "ACTIVATIONS",
    "DTYPES",
    "INPUT_SPACES",
    "ConfigError",
    "CrossLayerConfig",
    "TranscoderConfig",
    "check_field_types",
    "config_from_dict",
    "default_input_site",
    "default_output_site",
    "field_docs",
    "layer_of",
    "site_for_layer",
]

Activation = Literal["topk", "batchtopk", "relu", "jumprelu"]
InputSpace = Literal["folded_ln", "unfolded_ln", "no_ln", "any"]
Dtype = Literal["float32", "float64", "float16", "bfloat16"]

ACTIVATIONS = typing.get_args(Activation)
"""Supported activation functions. `topk` and `batchtopk` need `k`."""

INPUT_SPACES = typing.get_args(InputSpace)
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

DTYPES = typing.get_args(Dtype)


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


class ConfigError(TranscodersError, ValueError):
    """A config (or a file's config) has a missing, unknown or bad field."""


def site_for_layer(template: str, layer: int) -> str:
    """The hook name `template` gives for `layer`: `template` is a hook name, or one with
    `{layer}` in it (`'blocks.{layer}.hook_resid_mid'`); `ConfigError` for any other
    placeholder or brace."""
    try:
        return template.format(layer=layer)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"site template {template!r} is not a hook name or a template with {{layer}} in it "
            f"(e.g. 'blocks.{{layer}}.hook_resid_mid'): {type(err).__name__} {err}"
        ) from None


# --- what every config shares ---------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` (as sparsify and
    simple_parsing do), one paragraph of text per field name; {} without source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(inspect.cleandoc(following.value.value).split())
    return docs


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` fits the type annotation `hint` (the kinds configs use: int,
    float, bool, str, Literal, list[X], unions with None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args and not (isinstance(value, bool) and True not in args and False not in args)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe_hint(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_hint(a) for a in args)
    if origin is list:
        return "a list of " + {int: "integers", str: "strings", float: "numbers"}.get(args[0], str(args[0]))
    return {type(None): "None", bool: "True or False", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def check_field_types(config: Any) -> None:
    """Raise `ConfigError` naming the first field of dataclass `config` whose value does
    not fit its annotation."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _matches(value, hints[f.name]):
            raise ConfigError(f"{f.name} must be {_describe_hint(hints[f.name])}, got {value!r}")


def config_from_dict(cls: type, data: Any, what: str = "config"):
    """Build dataclass `cls` from a dict (`to_dict()` output, a file), refusing unknown
    and missing fields; the result's `__post_init__` validates it."""
    if not isinstance(data, dict):
        raise ConfigError(f"a {what} must be a JSON object (a dict), got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown} in a {what}; known fields: {sorted(fields)}")
    missing = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in data
    ]
    if missing:
        raise ConfigError(f"config is missing required field(s) {missing} of a {what}")
    # Fill the fields directly rather than through the generated __init__, so that a
    # wrong type reaches validate() and its ConfigError, whatever runtime type checker
    # may wrap __init__.
    config = cls.__new__(cls)
    for name, f in fields.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        config.__dict__[name] = data.get(name, default)
    config.__post_init__()
    return config


def check_positive(config: Any, least: dict[str, int]) -> None:
    """Raise `ConfigError` unless each named integer field is at least its bound."""
    for name, bound in least.items():
        value = getattr(config, name)
        if not _matches(value, int) or value < bound:
            kind = "a positive" if bound else "a non-negative"
            raise ConfigError(f"{name} must be {kind} integer, got {value!r}")


def check_k(config: Any) -> None:
    """Raise `ConfigError` unless a TopK-style config's `k` is in 1..d_latent."""
    if config.activation in ("topk", "batchtopk"):
        if config.k is None or config.k <= 0:
            raise ConfigError(f"activation {config.activation!r} needs k, a positive integer; got {config.k!r}")
        if config.k > config.d_latent:
            raise ConfigError(f"k={config.k} is larger than d_latent={config.d_latent}")


# --- the transcoder's config ------------------------------------------------------------


@dataclass
class TranscoderConfig:
    """Shape, sparsity rule and placement of a transcoder."""

    d_in: int
    """Width of the input site's activation (d_model for the MLP input)."""
    d_out: int
    """Width of the output site's activation (d_model for `hook_mlp_out`)."""
    d_latent: int
    """Number of latents (the dictionary size)."""
    layer: int
    """The transformer layer whose MLP this transcoder replaces."""
    activation: Activation = "topk"
    """The sparsifying activation (`ACTIVATIONS`)."""
    k: int | None = 32
    """Active latents per token for `topk` (exactly) and `batchtopk` (on average over a
    batch); ignored by `relu` and `jumprelu`."""
    skip: bool = False
    """Add the affine skip term `x @ W_skip.T` (a skip transcoder)."""
    input_site: str | None = None
    """Hook name read; default `blocks.{layer}.mlp.hook_in`."""
    output_site: str | None = None
    """Hook name written; default `blocks.{layer}.hook_mlp_out`."""
    input_space: InputSpace | None = None
    """The input space it was trained in (`INPUT_SPACES`), or None when unknown (splice
    then warns, because it cannot check the space)."""
    model_name: str | None = None
    """The model it was trained on, or None when unknown."""
    dtype: Dtype = "float32"
    """Parameter dtype."""

    def __post_init__(self) -> None:
        if self.input_site is None and isinstance(self.layer, int):
            self.input_site = default_input_site(self.layer)
        if self.output_site is None and isinstance(self.layer, int):
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
        """Raise `ConfigError` naming the first field of the wrong type or out of range."""
        check_positive(self, {"d_in": 1, "d_out": 1, "d_latent": 1, "layer": 0})
        check_field_types(self)
        check_k(self)
        for name in ("input_site", "output_site"):
            if not getattr(self, name):
                raise ConfigError(f"{name} must be a non-empty hook name, got {getattr(self, name)!r}")
        if self.skip and self.is_sae:
            raise ConfigError(
                "an SAE (input_site == output_site) cannot have a skip term: the skip would let it copy its input"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TranscoderConfig:
        """Build a config from `to_dict()` output, refusing unknown or missing fields."""
        return config_from_dict(cls, data, "transcoder config")


# --- the cross-layer transcoder's config ------------------------------------------------


@dataclass
class CrossLayerConfig:
    """Shape, sparsity rule and placement of a cross-layer transcoder (CLT): one encoder
    per covered layer reading that layer's MLP input, and from each layer's latents one
    decoder into the MLP output of that layer and of every later covered layer."""

    d_model: int
    """Width of the residual stream (the MLP input and output)."""
    d_latent: int
    """Latents per layer."""
    n_layers: int
    """Number of consecutive layers covered, from `first_layer`."""
    first_layer: int = 0
    """The first layer covered."""
    activation: Activation = "topk"
    """The sparsifying activation of every layer's encoder (`ACTIVATIONS`)."""
    k: int | None = 32
    """Active latents per token and layer for `topk` (exactly) and `batchtopk` (on
    average over a batch); ignored by `relu` and `jumprelu`."""
    skip: bool = False
    """Add an affine skip term `x_l @ W_skip[l].T` to each layer's reconstruction."""
    input_hook: str = "mlp.hook_in"
    """The hook each layer's encoder reads, relative to its block (`blocks.{l}.` is
    prefixed): by default the exact input of the MLP."""
    output_hook: str = "hook_mlp_out"
    """The hook each layer's reconstruction replaces, relative to its block."""
    input_space: InputSpace | None = None
    """The input space it was trained in (`INPUT_SPACES`), or None when unknown."""
    model_name: str | None = None
    """The model it was trained on, or None when unknown."""
    dtype: Dtype = "float32"
    """Parameter dtype."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def layers(self) -> range:
        """The covered layers, in order."""
        return range(self.first_layer, self.first_layer + self.n_layers)

    @property
    def uses_k(self) -> bool:
        """True for the TopK-style activations, whose sparsity is set by `k`."""
        return self.activation in ("topk", "batchtopk")

    def input_site(self, layer: int) -> str:
        """The hook read by layer `layer`'s encoder."""
        return f"blocks.{layer}.{self.input_hook}"

    def output_site(self, layer: int) -> str:
        """The hook layer `layer`'s reconstruction replaces."""
        return f"blocks.{layer}.{self.output_hook}"

    def validate(self) -> None:
        """Raise `ConfigError` naming the first field of the wrong type or out of range."""
        check_positive(self, {"d_model": 1, "d_latent": 1, "n_layers": 1, "first_layer": 0})
        check_field_types(self)
        check_k(self)
        for name in ("input_hook", "output_hook"):
            hook = getattr(self, name)
            if not hook or hook.startswith("blocks."):
                raise ConfigError(
                    f"{name} is a hook name within a block, such as 'mlp.hook_in' or 'hook_resid_mid' "
                    f"(blocks.{{layer}}. is prefixed), got {hook!r}"
                )
        if self.input_hook == self.output_hook:
            raise ConfigError("input_hook and output_hook are equal: a cross-layer transcoder maps one site to another")

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CrossLayerConfig:
        """Build a config from `to_dict()` output, refusing unknown or missing fields."""
        return config_from_dict(cls, data, "cross-layer transcoder config")
