"""Read transcoders and SAEs saved by other libraries; export for circuit-tracer.

Formats, detected from the files in a directory:

- `tl-transcoders`: `config.json` + `transcoder.safetensors` (`Transcoder.save`).
- `sparsify` (EleutherAI `eai-sparsify` 1.x): `cfg.json` + `sae.safetensors` in a
  directory named after the hookpoint (`layers.6.mlp`).
- `saelens` (SAELens 6): `cfg.json` + `sae_weights.safetensors`.
- `circuit-tracer` (0.5): `config.yaml` (`model_kind: transcoder_set`) naming one
  safetensors file per layer; or a cross-layer transcoder (`model_kind:
  cross_layer_transcoder`, `W_enc_{i}.safetensors` and `W_dec_{i}.safetensors`), loaded
  as a `CrossLayerTranscoder` (as is our own saved one).
- `clt-training` (EleutherAI's clt-training, a sparsify fork): a run's directory of
  hookpoint directories (`layers.N.mlp/cfg.json` + `sae.safetensors`) whose coders
  decode into later layers (`n_targets > 0`), loaded as a `CrossLayerTranscoder`.

A directory of directories in one of the first three formats (a sparsify training
run, our `layer_N/` checkpoints) loads as a list. `load_pretrained` returns a single
`Transcoder` for a directory holding one transcoder, and a list sorted by layer
otherwise (always a list for circuit-tracer). Conversions are exact: a file whose
computation a `Transcoder` cannot reproduce is refused with `TranscoderFileError`.
The readers (and the circuit-tracer writer) are in `tl_transcoders.io.formats`, one module
per library; docs/interop.md says how each format's fields map to a `TranscoderConfig`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tl_transcoders.core.clt import CrossLayerTranscoder
from tl_transcoders.core.config import INPUT_SPACES
from tl_transcoders.core.devices import checked_device
from tl_transcoders.core.errors import summary
from tl_transcoders.core.native import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    TranscoderFileError,
    check_mappable,
    read_config,
    read_tensors,
    saved_kind,
)
from tl_transcoders.core.transcoder import Transcoder, parameter_shapes
from tl_transcoders.io.formats import circuit_tracer, clt_training, saelens, sparsify
from tl_transcoders.io.formats.circuit_tracer import export_circuit_tracer
from tl_transcoders.io.formats.common import AUTO, Placement, Source, build
from tl_transcoders.io.formats.sparsify import hookpoint_sites as sparsify_hookpoint_sites

__all__ = [
    "AUTO",
    "FORMATS",
    "detect_format",
    "export_circuit_tracer",
    "load_directory",
    "load_pretrained",
    "sparsify_hookpoint_sites",
]

_DIRECTORY_FILES = {
    # format: (config file, weights file) of a directory holding one transcoder
    "tl-transcoders": (CONFIG_FILE, WEIGHTS_FILE),
    "saelens": saelens.FILES,
    "sparsify": sparsify.FILES,
}
FORMATS = (*_DIRECTORY_FILES, "circuit-tracer", "clt-training")

_HUB_FILES = (
    *dict.fromkeys(name for pair in _DIRECTORY_FILES.values() for name in pair),
    circuit_tracer.CONFIG_FILE,
    "layer_*.safetensors",
    "W_enc_*.safetensors",
    "W_dec_*.safetensors",
)


def _own_source(directory: Path, placement: Placement) -> Source:
    """Our own format (`Transcoder.save`): the saved config, with the caller's overrides."""
    cfg, checksum = read_config(directory / CONFIG_FILE)
    if placement != Placement():  # recompute only what the caller overrides
        if placement.input_space == AUTO:
            placement = dataclasses.replace(placement, input_space=cfg.input_space)
        cfg = placement.config(
            directory / CONFIG_FILE,
            d_in=cfg.d_in,
            d_out=cfg.d_out,
            d_latent=cfg.d_latent,
            activation=cfg.activation,
            k=cfg.k,
            skip=cfg.skip,
            layer=cfg.layer,
            input_site=cfg.input_site,
            output_site=cfg.output_site,
            ln_space=cfg.input_space,
            model_name=cfg.model_name,
        )
    shapes = parameter_shapes(cfg)
    return Source(cfg, lambda: read_tensors(directory / WEIGHTS_FILE, shapes, checksum), directory)


_SOURCE_READERS = {"tl-transcoders": _own_source, "saelens": saelens.source, "sparsify": sparsify.source}


def _directory_format(directory: Path) -> str | None:
    """The format of a directory holding one transcoder, or None. A weights file
    without its config is an error."""
    for name, (config, weights) in _DIRECTORY_FILES.items():
        if (directory / weights).is_file():
            if not (directory / config).is_file():
                raise TranscoderFileError(
                    f"{directory / config}: no such file, but {weights} is there: a {name} "
                    f"directory holds {config} and {weights}"
                )
            return name
    return None


def detect_format(directory: str | Path) -> str:
    """The format of the transcoder files in `directory` (one of `FORMATS`), directly
    in it or in its subdirectories. Raises `TranscoderFileError` when none is found or
    the subdirectories mix formats."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TranscoderFileError(f"{directory}: no such directory")
    if (directory / circuit_tracer.CONFIG_FILE).is_file():
        return "circuit-tracer"
    if clt_training.holds_cross_layer(directory):
        return "clt-training"
    found = _directory_format(directory)
    if found:
        return found
    kinds = {_directory_format(d) for d in directory.iterdir() if d.is_dir()} - {None}
    if len(kinds) == 1:
        return kinds.pop()
    if kinds:
        raise TranscoderFileError(f"{directory}: subdirectories mix formats {sorted(kinds)}")
    expected = "; ".join(f"{n}: {c} + {w}" for n, (c, w) in _DIRECTORY_FILES.items())
    raise TranscoderFileError(
        f"{directory}: no transcoder files found (looked for {expected}; circuit-tracer: "
        f"{circuit_tracer.CONFIG_FILE}), in it or in its subdirectories"
    )


def load_directory(
    directory: str | Path,
    *,
    layers: Sequence[int] | None = None,
    layer: int | None = None,
    input_site: str | None = None,
    output_site: str | None = None,
    input_space: str | None = AUTO,
    model_name: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    mmap: bool = False,
) -> Transcoder | list[Transcoder] | CrossLayerTranscoder:
    """Load the transcoders in a local directory, whatever its format (`detect_format`).

    Returns one `Transcoder` when `directory` holds one directly, else a list sorted by
    layer (always a list for circuit-tracer's transcoder sets); a `CrossLayerTranscoder`
    for a directory holding one (ours, circuit-tracer's `W_enc_{i}` / `W_dec_{i}`
    layout, or a clt-training run). `layers` keeps only those layers (read
    from disk only for them). The other arguments override what the files say or
    imply: `layer` (only for a single transcoder), `input_site` / `output_site` (hook
    names, or templates with `{layer}`), `input_space` (`"auto"`: from the format and
    the input site; or one of `INPUT_SPACES` or None), `model_name`; `dtype` (default:
    the file's) and `device`. `mmap=True` maps a cross-layer transcoder's decoders from
    its files (ours or circuit-tracer's) instead of reading them: see
    `CrossLayerTranscoder.load`."""
    directory, device = Path(directory), checked_device(device)
    if input_space != AUTO and input_space is not None and input_space not in INPUT_SPACES:
        raise TranscoderFileError(f"input_space must be {AUTO!r}, one of {INPUT_SPACES} or None, got {input_space!r}")
    clt = _cross_layer(directory, input_space, model_name, device, dtype, mmap)
    if mmap and clt is None:
        raise TranscoderFileError(
            f"{directory}: mmap=True applies to cross-layer transcoders (ours or circuit-tracer's); "
            "load a saved Transcoder with Transcoder.load(directory, mmap=True)"
        )
    if clt is not None:
        given = {"layers": layers, "layer": layer, "input_site": input_site, "output_site": output_site}
        bad = sorted(name for name, value in given.items() if value is not None)
        if bad:
            raise TranscoderFileError(f"{directory} holds a cross-layer transcoder: {bad} do not apply to it")
        return clt
    placement = Placement(layer, input_site, output_site, input_space, model_name)
    fmt = detect_format(directory)
    single = fmt != "circuit-tracer" and _directory_format(directory) is not None
    if layer is not None and not single:
        raise TranscoderFileError(
            f"{directory} holds several transcoders: layer= applies to one; use layers=[...] to select"
        )
    if fmt == "circuit-tracer":
        sources = circuit_tracer.sources(directory, placement, layers)
    elif single:
        sources = [_SOURCE_READERS[fmt](directory, placement)]
    else:
        subdirs = sorted(d for d in directory.iterdir() if d.is_dir() and _directory_format(d))
        sources = [_SOURCE_READERS[fmt](d, placement) for d in subdirs]
    if layers is not None:
        missing = sorted(set(layers) - {s.cfg.layer for s in sources})
        if missing:
            raise TranscoderFileError(
                f"{directory}: no transcoder for layer(s) {missing}; it has layers "
                f"{sorted({s.cfg.layer for s in sources})}"
            )
        sources = [s for s in sources if s.cfg.layer in layers]
    transcoders = [build(s, device, dtype) for s in sources]
    if single:
        return transcoders[0]
    return sorted(transcoders, key=lambda t: (t.cfg.layer, t.cfg.input_site, t.cfg.output_site))


def _cross_layer(
    directory: Path,
    input_space: str | None,
    model_name: str | None,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    mmap: bool,
) -> CrossLayerTranscoder | None:
    """The cross-layer transcoder in `directory` (ours, circuit-tracer's layout or a
    clt-training run), or None when it holds none; `input_space` (unless `"auto"`) and
    `model_name` override what the files say. One layer's directory of a clt-training
    run is refused, naming the run's directory to load instead."""
    if not directory.is_dir():
        return None
    if clt_training.is_layer(directory):
        raise TranscoderFileError(
            f"{directory} holds one layer of a clt-training cross-layer transcoder (its decoders write "
            f"into later layers too); load the run's directory, {directory.parent}"
        )
    if clt_training.holds_cross_layer(directory):  # before ours: its run's config.json is not ours
        if mmap:
            raise TranscoderFileError(
                f"{directory}: a clt-training run's decoders are laid out anew as they are read, so they "
                "cannot be memory-mapped; load it without mmap, save it (clt.save(path)) and load that "
                "with mmap=True"
            )
        clt = CrossLayerTranscoder.from_tensors(*clt_training.read_cross_layer(directory, dtype), device, dtype)
        cfg = clt.cfg
    elif (directory / CONFIG_FILE).is_file() and saved_kind(directory / CONFIG_FILE) == CrossLayerTranscoder.KIND:
        clt = CrossLayerTranscoder.load(directory, device, dtype, mmap=mmap)
        cfg = clt.cfg
    elif circuit_tracer.holds_cross_layer(directory):
        if mmap:
            check_mappable(directory, device, dtype)
        cfg, tensors = circuit_tracer.read_cross_layer(directory, input_space, model_name, dtype, mmap)
        clt = CrossLayerTranscoder.from_tensors(cfg, tensors, device, dtype, checked_finite=mmap)
        cfg = clt.cfg
    else:
        return None
    if input_space != AUTO:
        cfg.input_space = input_space
    if model_name is not None:
        cfg.model_name = model_name
    cfg.validate()
    return clt


def load_pretrained(
    repo_or_dir: str | os.PathLike,
    subfolder: str | None = None,
    revision: str | None = None,
    **kwargs: Any,
) -> Transcoder | list[Transcoder] | CrossLayerTranscoder:
    """Load transcoders from a local directory or a Hugging Face Hub repository.

    A path to an existing directory is read offline (`subfolder` joined to it).
    Anything else is a Hub repo id: `huggingface_hub.snapshot_download` fetches, at
    `revision`, only the transcoder files of the formats read here (under `subfolder`
    if given: e.g. a sparsify hookpoint such as `layers.6.mlp`, or one SAELens SAE's
    folder). Then as `load_directory`, which takes `kwargs`."""
    path = Path(repo_or_dir)
    if path.is_dir():
        if revision is not None:
            raise TranscoderFileError(f"revision= applies to Hub repositories, but {path} is a local directory")
        return load_directory(path / subfolder if subfolder else path, **kwargs)
    text = str(repo_or_dir)
    if path.is_absolute() or text.startswith(".") or text.count("/") > 1:
        raise TranscoderFileError(f"{text}: no such directory (and not a Hub repo id 'owner/name')")
    import huggingface_hub

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [prefix + p for name in _HUB_FILES for p in (name, f"*/{name}")]
    try:
        root = Path(huggingface_hub.snapshot_download(text, revision=revision, allow_patterns=patterns))
    except (OSError, ValueError) as err:  # not found, offline, bad revision
        raise TranscoderFileError(
            f"{text!r} is neither a local directory nor a Hugging Face Hub repository that could be reached "
            f"({summary(err)}); check the path, the "
            "repo id and that the Hub can be reached"
        ) from err
    directory = root / subfolder if subfolder else root
    if not directory.is_dir():
        raise TranscoderFileError(f"{text}: the repository has no transcoder files under {subfolder!r}")
    return load_directory(directory, **kwargs)
