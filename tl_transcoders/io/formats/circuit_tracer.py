"""circuit-tracer 0.5 transcoder sets: `config.yaml` (`model_kind: transcoder_set`)
naming one safetensors file per layer. Read, and written by `export_circuit_tracer`."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from tl_transcoders.core.files import atomic_write
from tl_transcoders.core.native import TranscoderFileError, read_tensors
from tl_transcoders.core.transcoder import Transcoder
from tl_transcoders.io.formats.common import LN_SITES, Placement, Source, field, read_yaml, tensor_names

__all__ = ["CONFIG_FILE", "export_circuit_tracer", "sources"]

CONFIG_FILE = "config.yaml"


def _local_file(directory: Path, entry: str) -> Path:
    """The local file for one entry of `transcoders:` in a circuit-tracer config: a
    path (absolute, or relative to the config; a moved directory is found by file name)
    or an `hf://owner/repo/path[@revision]` URI (looked up in `directory`, a snapshot of
    that repository, before it is downloaded)."""
    if not entry.startswith("hf://"):
        path = Path(entry) if Path(entry).is_absolute() else directory / entry
        return path if path.exists() else directory / path.name
    ref, _, revision = entry.removeprefix("hf://").partition("@")
    parts = ref.split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    for local in (directory / filename, directory / Path(filename).name):
        if local.is_file():
            return local
    import huggingface_hub

    return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision or None))


def sources(directory: Path, placement: Placement, layers: Sequence[int] | None) -> list[Source]:
    """The transcoders of the set whose `config.yaml` is in `directory` (layer i is the
    i-th file), only those of `layers` if given."""
    path = directory / CONFIG_FILE
    cfg = read_yaml(path)
    kind = field(cfg, path, "model_kind", str)
    if kind != "transcoder_set":
        raise TranscoderFileError(
            f"{path}: model_kind {kind!r} is not supported; only per-layer transcoders "
            "('transcoder_set') map to Transcoder (cross-layer transcoders do not)"
        )
    read_hook = field(cfg, path, "feature_input_hook", str)
    write_hook = field(cfg, path, "feature_output_hook", str)
    entries = field(cfg, path, "transcoders", list, None)
    if entries is None:
        files = {
            int(m.group(1)): f
            for f in directory.glob("layer_*.safetensors")
            if (m := re.fullmatch(r"layer_(\d+)\.safetensors", f.name))
        }
        entries = [str(files[i]) for i in range(len(files)) if i in files]
        if not entries or len(entries) != len(files):
            raise TranscoderFileError(
                f"{path}: no 'transcoders' list and no layer_0..layer_N.safetensors files "
                f"next to it (found {sorted(f.name for f in files.values())})"
            )
    missing = sorted(set(layers or ()) - set(range(len(entries))))
    if missing:
        raise TranscoderFileError(f"{path}: no transcoder for layer(s) {missing}; it has layers 0..{len(entries) - 1}")
    ln_space = field(cfg, path, "input_space", str, "unfolded_ln")
    return [
        _layer_source(
            _local_file(directory, str(entry)),
            layer,
            read_hook,
            write_hook,
            ln_space,
            field(cfg, path, "model_name", str, None),
            placement,
        )
        for layer, entry in enumerate(entries)
        if layers is None or layer in layers
    ]


def _layer_source(
    path: Path,
    layer: int,
    read_hook: str,
    write_hook: str,
    ln_space: str,
    model_name: str | None,
    placement: Placement,
) -> Source:
    """Layer `layer`'s transcoder in the safetensors file `path`; its shape, skip term and
    activation (JumpReLU when a threshold is stored) are read from the file's header."""
    if path.suffix != ".safetensors":
        raise TranscoderFileError(f"{path}: only safetensors transcoder files are supported")
    names = tensor_names(path)
    for name in ("b_enc", "b_dec"):
        if name not in names or len(names[name]) != 1:
            raise TranscoderFileError(f"{path}: tensor {name!r} is missing or not a vector")
    (d_latent,), (d_model,) = names["b_enc"], names["b_dec"]
    skip = "W_skip" in names
    activation = "jumprelu" if "activation_function.threshold" in names else "relu"
    config = placement.config(
        path,
        d_in=d_model,
        d_out=d_model,
        d_latent=d_latent,
        activation=activation,
        skip=skip,
        layer=layer,
        input_site=f"blocks.{{layer}}.{read_hook}",
        output_site=f"blocks.{{layer}}.{write_hook}",
        ln_space=ln_space,
        model_name=model_name,
    )

    def read() -> dict[str, Tensor]:
        shapes = {"W_enc": (d_latent, d_model), "b_enc": (d_latent,), "W_dec": (d_latent, d_model), "b_dec": (d_model,)}
        if skip:
            shapes["W_skip"] = (d_model, d_model)
        if activation == "jumprelu":
            shapes["activation_function.threshold"] = (d_latent,)
        t = read_tensors(path, shapes)
        if activation == "jumprelu":
            t["threshold"] = t.pop("activation_function.threshold")
        return t

    return Source(config, read, path)


def export_circuit_tracer(
    transcoders: Sequence[Transcoder],
    directory: str | Path,
    scan: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write `transcoders` (one per layer, layers 0..n-1) as a circuit-tracer 0.5
    transcoder set: `layer_{i}.safetensors` and `config.yaml` in `directory`.

    `scan` names the set (circuit-tracer requires one; Neuronpedia uses it to find
    feature pages); default: the directory's name. The config lists the files by
    absolute path, which circuit-tracer's local loader needs; with `repo_id` it lists
    `hf://{repo_id}/layer_{i}.safetensors` instead, for a directory to upload as that
    Hub repository. circuit-tracer runs only ReLU and JumpReLU transcoders whose input
    and output are d_model wide; BatchTopK is written as the JumpReLU it computes in
    eval mode, and TopK is refused. Returns the directory."""
    transcoders = sorted(transcoders, key=lambda t: t.cfg.layer)
    layers = [t.cfg.layer for t in transcoders]
    if layers != list(range(len(transcoders))):
        raise TranscoderFileError(
            f"circuit-tracer needs exactly one transcoder for each layer 0..n-1, got layers {layers}"
        )
    hooks = set()
    for t in transcoders:
        c = t.cfg
        if c.activation == "topk":
            raise TranscoderFileError(
                f"layer {c.layer}: circuit-tracer cannot run TopK transcoders (only ReLU and JumpReLU)"
            )
        if c.d_in != c.d_out or c.d_latent != transcoders[0].cfg.d_latent:
            raise TranscoderFileError(
                "circuit-tracer needs d_in == d_out (d_model) and the same d_latent in every "
                f"layer; layer {c.layer} has d_in={c.d_in}, d_out={c.d_out}, d_latent={c.d_latent}"
            )
        prefix = f"blocks.{c.layer}."
        if not (c.input_site.startswith(prefix) and c.output_site.startswith(prefix)):
            raise TranscoderFileError(
                f"layer {c.layer}: sites {c.input_site}, {c.output_site} are not in block {c.layer}"
            )
        hooks.add((c.input_site.removeprefix(prefix), c.output_site.removeprefix(prefix), c.input_space))
    if len(hooks) != 1:
        raise TranscoderFileError(f"circuit-tracer needs the same hooks in every layer, got {sorted(hooks, key=str)}")
    [(read_hook, write_hook, input_space)] = hooks
    if input_space == "folded_ln" and read_hook.endswith(LN_SITES):
        warnings.warn(
            f"these transcoders read {read_hook} with folded layer norms, but circuit-tracer "
            "runs models unfolded (fold_ln=False): they will see other inputs there",
            stacklevel=2,
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for t in transcoders:
        tensors = {"W_enc": t.W_enc, "W_dec": t.W_dec, "b_enc": t.b_enc, "b_dec": t.b_dec}
        if t.cfg.skip:
            tensors["W_skip"] = t.W_skip
        if t.cfg.activation in ("jumprelu", "batchtopk"):
            tensors["activation_function.threshold"] = t.threshold
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        path = directory / f"layer_{t.cfg.layer}.safetensors"
        atomic_write(path, lambda p, tensors=tensors: save_file(tensors, p))
        files.append(f"hf://{repo_id}/{path.name}" if repo_id else str(path.resolve()))
    config: dict[str, Any] = {
        "model_kind": "transcoder_set",
        "scan": scan or directory.resolve().name,
        "feature_input_hook": read_hook,
        "feature_output_hook": write_hook,
        "transcoders": files,
    }
    names = {t.cfg.model_name for t in transcoders}
    if len(names) == 1 and None not in names:
        config["model_name"] = names.pop()
    if input_space is not None:
        config["input_space"] = input_space

    import yaml

    text = yaml.safe_dump(config, sort_keys=False)
    atomic_write(directory / CONFIG_FILE, lambda p: Path(p).write_text(text))
    return directory
