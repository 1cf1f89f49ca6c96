"""The native file format of a transcoder: a directory holding `config.json` (a format
tag, a version, the kind of module, its config and the SHA-256 of the weights file) and
`transcoder.safetensors` (the tensors). The kind is `transcoder` (`TranscoderConfig`)
or `cross_layer_transcoder` (`CrossLayerConfig`); files without one are transcoders.

`write_directory` replaces the directory as a whole (`files.atomic_directory`), so an
interrupted save leaves the previous transcoder loadable. `read_config` and
`read_tensors` check every field, the checksum and every tensor before anything is built
from them, and raise `TranscoderFileError` naming the file and the problem. Version 1
files (without a checksum) are still read.

`read_tensors` checks a safetensors file from its header (`stored_layout`) and one
streaming pass over its bytes (`scan_stored`: the checksum and finite values, one block
in memory at a time), then loads the tensors into memory or, with `mmap=True`, maps
them from the file (`map_stored`): pages are read when touched, so a module larger than
memory can be used where only some rows are read (a prompt's active latents' decoders).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from tl_transcoders.core.config import ConfigError, CrossLayerConfig, TranscoderConfig
from tl_transcoders.core.errors import TranscodersError
from tl_transcoders.core.files import atomic_directory, read_mapping

__all__ = [
    "CONFIG_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KINDS",
    "WEIGHTS_FILE",
    "SavedConfig",
    "StoredTensor",
    "TranscoderFileError",
    "check_mappable",
    "map_stored",
    "read_config",
    "read_tensors",
    "saved_kind",
    "scan_stored",
    "stored_layout",
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


SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""The safetensors dtype names read, and their torch dtypes."""
SCAN_BLOCK = 1 << 24
"""Bytes read at a time by `scan_stored`."""


class StoredTensor(NamedTuple):
    """One tensor of a safetensors file as its header describes it: `start` and `end`
    are byte offsets in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _corrupt(path: Path, problem: str) -> TranscoderFileError:
    return TranscoderFileError(f"{path}: cannot read the safetensors file, it may be truncated or corrupt ({problem})")


def stored_layout(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of the safetensors file at `path`, from its header alone; raises
    `TranscoderFileError` for a header that is malformed or describes bytes the file
    does not hold."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length > size - 8:
                raise _corrupt(path, f"a header of {length} bytes in a file of {size}")
            header = json.loads(handle.read(length))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _corrupt(path, str(err)) from err
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    layout = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise _corrupt(path, f"tensor {name}'s entry {entry!r} is not understood") from err
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0 or 8 + length + end > size:
            raise _corrupt(path, f"tensor {name} of shape {shape} does not fit the bytes the file holds")
        layout[name] = StoredTensor(dtype, shape, 8 + length + begin, 8 + length + end)
    return layout


def scan_stored(path: Path, layout: dict[str, StoredTensor]) -> str:
    """Read the file at `path` once, one block at a time: raise `TranscoderFileError`
    if a floating-point tensor of `layout` holds NaN or inf, and return the SHA-256 of
    the file's bytes."""
    digest = hashlib.sha256()
    block = bytearray(SCAN_BLOCK)
    position = 0
    with open(path, "rb") as handle:

        def read(n: int) -> memoryview:
            got = handle.readinto(memoryview(block)[:n])
            if got != n:
                raise _corrupt(path, "the file ended early")
            digest.update(memoryview(block)[:n])
            return memoryview(block)[:n]

        for name, stored in sorted(layout.items(), key=lambda item: item[1].start):
            while position < stored.start:
                position += len(read(min(SCAN_BLOCK, stored.start - position)))
            step = SCAN_BLOCK - SCAN_BLOCK % stored.dtype.itemsize
            while position < stored.end:
                chunk = read(min(step, stored.end - position))
                position += len(chunk)
                values = torch.frombuffer(chunk, dtype=stored.dtype)
                if stored.dtype.is_floating_point and not torch.isfinite(values).all():
                    raise TranscoderFileError(f"{path}: tensor {name} holds NaN or inf values")
        for chunk in iter(lambda: handle.read(SCAN_BLOCK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def map_stored(path: Path, layout: dict[str, StoredTensor], row_read: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """The tensors of `layout`, mapped copy-on-write from the file at `path`: nothing is
    read until a tensor's pages are touched, and writing to a tensor never changes the
    file. Tensors whose names start with one of `row_read` are read a few rows at a
    time (decoders, gathered per active latent): the system reads no further ahead
    than the pages touched there."""
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    page = mmap.PAGESIZE
    tensors = {}
    for name, stored in layout.items():
        n = math.prod(stored.shape)
        if n == 0:
            tensors[name] = torch.empty(stored.shape, dtype=stored.dtype)
            continue
        if name.startswith(row_read) and hasattr(mmap, "MADV_RANDOM"):
            first = stored.start - stored.start % page
            mapped.madvise(mmap.MADV_RANDOM, first, stored.end - first)
        tensors[name] = torch.frombuffer(mapped, dtype=stored.dtype, count=n, offset=stored.start).view(stored.shape)
    return tensors


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
                "weights_sha256": scan_stored(tmp / WEIGHTS_FILE, stored_layout(tmp / WEIGHTS_FILE)),
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
    header = read_mapping(path, TranscoderFileError)
    if header.get("format") != FORMAT_NAME:
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


def check_mappable(
    path: Path, device: str | torch.device | None, dtype: torch.dtype | None, stored_dtype: str | None = None
) -> None:
    """Refuse, naming `path`, a `device` or `dtype` that memory-mapped weights (read on
    the CPU, in their stored dtype: `stored_dtype` where known) cannot be given without
    reading them all."""
    if device is not None and torch.device(device).type != "cpu":
        raise TranscoderFileError(
            f"{path}: mmap=True maps the weights from the file into CPU memory; load it with "
            f"device='cpu' (or None), or without mmap to put the weights on {device}"
        )
    if dtype is not None and (stored_dtype is None or dtype != getattr(torch, stored_dtype)):
        raise TranscoderFileError(
            f"{path}: mmap=True keeps the stored dtype ({stored_dtype or 'that of the files'}); "
            f"load without mmap to convert to {dtype}"
        )


def read_tensors(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    sha256: str | None = None,
    *,
    mmap: bool = False,
    row_read: tuple[str, ...] = ("W_dec",),
) -> dict[str, Tensor]:
    """Load a safetensors file and check it holds exactly `shapes`, all floating-point and
    finite, and (when `sha256` is given) that its bytes have that checksum; the checks
    read the file once, one block at a time. With `mmap` the tensors are mapped from the
    file (`map_stored`, `row_read` naming the tensors read by rows) instead of read into
    memory."""
    if not path.is_file():
        raise TranscoderFileError(f"{path}: no such file (the transcoder's weights)")
    layout = stored_layout(path)
    missing = sorted(set(shapes) - set(layout))
    unexpected = sorted(set(layout) - set(shapes))
    if missing or unexpected:
        raise TranscoderFileError(
            f"{path}: tensors do not match the config: missing {missing}, unexpected {unexpected}"
        )
    for name, shape in shapes.items():
        if layout[name].shape != shape:
            raise TranscoderFileError(
                f"{path}: tensor {name} has shape {layout[name].shape}, the config requires {shape}"
            )
        if not layout[name].dtype.is_floating_point:
            raise TranscoderFileError(f"{path}: tensor {name} holds non-float values ({layout[name].dtype})")
    digest = scan_stored(path, layout)
    if sha256 is not None and digest != sha256:
        raise TranscoderFileError(
            f"{path}: the file's checksum does not match the one saved with its config; the "
            "weights were changed or damaged after saving (copy the transcoder again, or save it anew)"
        )
    if mmap:
        return map_stored(path, layout, row_read)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise _corrupt(path, str(err)) from err
