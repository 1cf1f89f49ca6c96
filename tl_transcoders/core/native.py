"""The native file format of a transcoder: a directory holding `config.json` (a format
tag, a version and the config) and `transcoder.safetensors` (the tensors).

`read_config` and `read_tensors` check every field and tensor before anything is built
from them, and raise `TranscoderFileError` naming the file and the problem.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from tl_transcoders.core.config import ConfigError, TranscoderConfig

__all__ = ["CONFIG_FILE", "FORMAT_NAME", "FORMAT_VERSION", "WEIGHTS_FILE", "TranscoderFileError", "read_config", "read_tensors"]

FORMAT_NAME = "tl-transcoders"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "transcoder.safetensors"


class TranscoderFileError(ValueError):
    """A saved transcoder cannot be read: the message names the file and the problem."""


def read_config(path: Path) -> TranscoderConfig:
    """Parse and validate a `config.json` written by `Transcoder.save`."""
    if not path.is_file():
        raise TranscoderFileError(
            f"{path}: no such file. A saved transcoder is a directory holding "
            f"{CONFIG_FILE} and {WEIGHTS_FILE} (written by Transcoder.save)."
        )
    try:
        header = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TranscoderFileError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise TranscoderFileError(
            f"{path}: not a tl-transcoders config (expected \"format\": \"{FORMAT_NAME}\")"
        )
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise TranscoderFileError(
            f"{path}: format_version {version!r} is not supported; this version of "
            f"tl-transcoders reads version {FORMAT_VERSION}. Upgrade tl-transcoders to "
            "read files written by a newer release."
        )
    try:
        return TranscoderConfig.from_dict(header.get("config"))
    except ConfigError as err:
        raise TranscoderFileError(f"{path}: {err}") from err


def read_tensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Load a safetensors file and check it holds exactly `shapes`, all finite."""
    if not path.is_file():
        raise TranscoderFileError(f"{path}: no such file (the transcoder's weights)")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise TranscoderFileError(
            f"{path}: cannot read the safetensors file, it may be truncated or corrupt ({err})"
        ) from err
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise TranscoderFileError(
            f"{path}: tensors do not match the config: missing {missing}, unexpected {unexpected}"
        )
    for name, shape in shapes.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise TranscoderFileError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"the config requires {shape}"
            )
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise TranscoderFileError(f"{path}: tensor {name} holds NaN, inf or non-float values")
    return tensors
