"""What the format readers share: the caller's placement overrides, a found transcoder
(`Source`) and how it is built, and checked reading of config fields and files."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from tl_transcoders.core.config import ConfigError, TranscoderConfig, site_for_layer
from tl_transcoders.core.files import read_mapping
from tl_transcoders.core.native import TranscoderFileError
from tl_transcoders.core.transcoder import Transcoder

__all__ = [
    "AUTO",
    "LN_SITES",
    "Placement",
    "Source",
    "build",
    "field",
    "fold_input_shift",
    "read_json",
    "read_yaml",
    "tensor_names",
]

AUTO = "auto"
"""`input_space` value meaning: derive it from the format and the input site."""

LN_SITES = ("mlp.hook_in", "ln2.hook_out")
"""Sites whose values depend on whether the layer norm's weights are folded."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """The caller's overrides of where a loaded transcoder sits. Sites may be templates
    with `{layer}`."""

    layer: int | None = None
    input_site: str | None = None
    output_site: str | None = None
    input_space: str | None = AUTO
    model_name: str | None = None

    def config(
        self,
        path: Path,
        *,
        d_in: int,
        d_out: int,
        d_latent: int,
        activation: str,
        skip: bool,
        layer: int | None,
        input_site: str | None,
        output_site: str | None,
        ln_space: str | None,
        model_name: str | None = None,
        k: int | None = None,
    ) -> TranscoderConfig:
        """The config of a transcoder read from `path`, given what the file says (`layer`,
        sites as templates, `ln_space`: the space of an input read after the layer norm)
        and the overrides."""
        layer = self.layer if self.layer is not None else layer
        if layer is None:
            raise TranscoderFileError(
                f"{path}: the file does not say which layer the transcoder belongs to; "
                "pass layer=N (and input_site=/output_site= if they are not the MLP's)"
            )
        sites = {}
        for name, override, found in (
            ("input_site", self.input_site, input_site),
            ("output_site", self.output_site, output_site),
        ):
            site = override if override is not None else found
            if site is None:
                raise TranscoderFileError(
                    f"{path}: cannot tell which TransformerLens hook the transcoder "
                    f"{'reads' if name == 'input_site' else 'writes'}; pass {name}= "
                    "(a hook name, or a template such as 'blocks.{layer}.hook_resid_mid')"
                )
            try:
                sites[name] = site_for_layer(site, layer)
            except ConfigError as err:
                raise TranscoderFileError(f"{path}: {name}: {err}") from err
        space = self.input_space
        if space == AUTO:
            space = ln_space if sites["input_site"].endswith(LN_SITES) else "any"
        try:
            return TranscoderConfig(
                d_in=d_in,
                d_out=d_out,
                d_latent=d_latent,
                layer=layer,
                activation=activation,
                k=k,
                skip=skip,
                input_space=space,
                model_name=self.model_name if self.model_name is not None else model_name,
                **sites,
            )
        except ConfigError as err:
            raise TranscoderFileError(f"{path}: {err}") from err


class Source(NamedTuple):
    """A transcoder found on disk: its config, and how to read its tensors (named as
    `Transcoder` parameters) once it is known to be wanted."""

    cfg: TranscoderConfig
    read: Callable[[], dict[str, Tensor]]
    path: Path


def build(source: Source, device: str | torch.device | None, dtype: torch.dtype | None) -> Transcoder:
    """Read the source's tensors into a `Transcoder` in eval mode, in `dtype` (default:
    the file's) on `device`."""
    try:
        return Transcoder.from_tensors(source.cfg, source.read(), device, dtype)
    except ConfigError as err:
        raise TranscoderFileError(f"{source.path}: {err}") from err


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; `TranscoderFileError` naming the file otherwise."""
    return read_mapping(path, TranscoderFileError)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from `path`; `TranscoderFileError` naming the file otherwise."""
    return read_mapping(path, TranscoderFileError, "YAML")


def field(data: dict[str, Any], path: Path, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """`data[name]`, checked to be of `kind` (a missing field takes `default` if given)."""
    if name not in data or data[name] is None:
        if default is ...:
            raise TranscoderFileError(f"{path}: the config has no {name!r} field")
        return default
    value = data[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise TranscoderFileError(f"{path}: field {name!r} has the wrong type ({value!r})")
    return value


def tensor_names(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in a safetensors file, read from its header."""
    if not path.is_file():
        raise TranscoderFileError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise TranscoderFileError(
            f"{path}: cannot read the safetensors file, it may be truncated or corrupt ({err})"
        ) from err


def fold_input_shift(W_enc: Tensor, b_enc: Tensor, shift: Tensor) -> Tensor:
    """`b_enc - W_enc @ shift` (in float64), so that encoding x equals encoding x - shift
    with the original bias."""
    return (b_enc.double() - W_enc.double() @ shift.double()).to(b_enc.dtype)
