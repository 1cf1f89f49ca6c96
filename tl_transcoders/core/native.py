"""The native file format of a transcoder: a directory holding `config.json` (a format
tag, a version, the kind of module, its config and the SHA-256 of the weights file) and
`transcoder.safetensors` (the tensors). The kind is `transcoder` (`TranscoderConfig`)
or `cross_layer_transcoder` (`CrossLayerConfig`); files without one are transcoders.

`write_directory` replaces the directory as a whole (`files.atomic_directory`), so an
interrupted save leaves the previous transcoder loadable. `read_config` and
`read_tensors` check every field, the checksum and every tensor before anything is built
from them, and raise `TranscoderFileError` naming the file and the problem. Version 1
files (without a checksum) are still read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from tl_transcoders.core.config import ConfigError, CrossLayerConfig, TranscoderConfig
from tl_transcoders.core.errors import TranscodersError
from tl_transcoders.core.files import atomic_directory

__all__ = [
    "CONFIG_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KINDS",
    "WEIGHTS_FILE",
    "SavedConfig",
    "TranscoderFileError",
    "read_config",
    "read_tensors",
    "saved_kind",
    "write_directory",
]

FORMAT_NAME = "tl-transcoders"
FORMAT_VERSION = 2
"""Version 2 added `weights_sha256`; version 1 files are read without it."""
READABLE_VERSIONS = (1, 2)
KINDS: dict[str, type] = {"transcoder": TranscoderConfig, "cross_layer_transcoder": CrossLayerConfig}
"""The modules a native directory can hold, by the `kind` written in its header."""
LOADERS = {"transcoder": "Transcoder.load", "cross_layer_transcoder": "CrossLayerTranscoder.load"}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "transcoder.safetensors"


class TranscoderFileError(TranscodersError, ValueError):
    """A saved transcoder cannot be read or written: the message names the file and the problem."""


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_directory(
    directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, Tensor], kind: str = "transcoder"
) -> Path:
    """Write `tensors` (CPU, contiguous) and `config` (of a module of `kind`, one of
    `KINDS`) to `directory` in the native format, replacing an earlier transcoder there
    as a whole. Refuses non-finite tensors and a directory that holds anything but a
    transcoder's files."""
    directory = Path(directory)
    bad = sorted(name for name, t in tensors.items() if not torch.isfinite(t).all())
    if bad:
        raise TranscoderFileError(
            f"{directory}: not saved, tensor(s) {bad} hold NaN or inf (a diverged run or damaged "
            "weights); nothing was written"
        )
    if directory.is_file():
        raise TranscoderFileError(f"{directory} is a file; give a directory to save the transcoder in")
    if directory.is_dir():
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in (CONFIG_FILE, WEIGHTS_FILE))
        if foreign:
            raise TranscoderFileError(
                f"{directory}: not saved, the directory holds other files ({', '.join(foreign[:5])}) that "
                "saving would replace; save into a new directory or one that holds only a transcoder"
            )
    try:
        with atomic_directory(directory) as tmp:
            save_file(tensors, tmp / WEIGHTS_FILE)
            header = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "kind": kind,
                "config": config,
                "weights_sha256": file_sha256(tmp / WEIGHTS_FILE),
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(header, indent=2) + "\n")
    except OSError as err:
        raise TranscoderFileError(f"{directory}: cannot write the transcoder there ({err})") from err
    return directory


def _read_header(path: Path) -> dict[str, Any]:
    """The checked JSON header of a `config.json` written by `write_directory`."""
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
        raise TranscoderFileError(f'{path}: not a tl-transcoders config (expected "format": "{FORMAT_NAME}")')
    version = header.get("format_version")
    if version not in READABLE_VERSIONS:
        raise TranscoderFileError(
            f"{path}: format_version {version!r} is not supported; this version of "
            f"tl-transcoders reads versions {READABLE_VERSIONS}. Upgrade tl-transcoders to "
            "read files written by a newer release."
        )
    checksum = header.get("weights_sha256")
    if version >= 2 and not (isinstance(checksum, str) and len(checksum) == 64):
        raise TranscoderFileError(f"{path}: the weights checksum (weights_sha256) is missing or malformed")
    return header


class SavedConfig(NamedTuple):
    """A saved transcoder's config and the checksum of its weights file (None in
    version 1 files)."""

    config: TranscoderConfig | CrossLayerConfig
    weights_sha256: str | None


def saved_kind(path: Path) -> str:
    """The kind of module (a key of `KINDS`) whose `config.json` is at `path`."""
    found = _read_header(path).get("kind", "transcoder")
    if found not in KINDS:
        raise TranscoderFileError(f"{path}: unknown kind {found!r}; this version reads {sorted(KINDS)}")
    return found


def read_config(path: Path, kind: str = "transcoder") -> SavedConfig:
    """Parse and validate a `config.json` written by `save` of a module of `kind`;
    a directory holding another kind is refused, naming the loader that reads it."""
    header = _read_header(path)
    found = saved_kind(path)
    if found != kind:
        raise TranscoderFileError(
            f"{path}: this directory holds a {found.replace('_', ' ')}, not a {kind.replace('_', ' ')}; "
            f"load it with {LOADERS[found]}"
        )
    try:
        config = KINDS[kind].from_dict(header.get("config"))
    except ConfigError as err:
        raise TranscoderFileError(f"{path}: {err}") from err
    return SavedConfig(config, header.get("weights_sha256"))


def read_tensors(path: Path, shapes: dict[str, tuple[int, ...]], sha256: str | None = None) -> dict[str, Tensor]:
    """Load a safetensors file and check it holds exactly `shapes`, all finite, and (when
    `sha256` is given) that its bytes have that checksum."""
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
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the config requires {shape}"
            )
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise TranscoderFileError(f"{path}: tensor {name} holds NaN, inf or non-float values")
    if sha256 is not None and file_sha256(path) != sha256:
        raise TranscoderFileError(
            f"{path}: the file's checksum does not match the one saved with its config; the "
            "weights were changed or damaged after saving (copy the transcoder again, or save it anew)"
        )
    return tensors
