"""circuit-tracer 0.5 transcoder sets: `config.yaml` (`model_kind: transcoder_set`)
naming one safetensors file per layer; and its cross-layer transcoders (`model_kind:
cross_layer_transcoder`, `W_enc_{i}` / `W_dec_{i}` files). Read, and written by
`export_circuit_tracer`."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from tl_transcoders.core.clt import CrossLayerTranscoder
from tl_transcoders.core.config import ConfigError, CrossLayerConfig
from tl_transcoders.core.errors import summary
from tl_transcoders.core.files import atomic_directory
from tl_transcoders.core.module import NativeModule
from tl_transcoders.core.native import TranscoderFileError, read_tensors
from tl_transcoders.core.transcoder import Transcoder
from tl_transcoders.io.formats.common import AUTO, LN_SITES, Placement, Source, field, read_yaml, tensor_names

__all__ = [
    "CONFIG_FILE",
    "export_circuit_tracer",
    "export_cross_layer",
    "holds_cross_layer",
    "read_cross_layer",
    "sources",
]

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

    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision or None))
    except (OSError, ValueError) as err:  # not found, offline (LocalEntryNotFoundError), bad revision
        raise TranscoderFileError(
            f"{directory / CONFIG_FILE}: {entry} is neither in {directory} nor downloadable from the Hugging Face "
            f"Hub ({summary(err)}); put the file beside the config or check the repository and your connection"
        ) from err


def sources(directory: Path, placement: Placement, layers: Sequence[int] | None) -> list[Source]:
    """The transcoders of the set whose `config.yaml` is in `directory` (layer i is the
    i-th file), only those of `layers` if given."""
    path = directory / CONFIG_FILE
    cfg = read_yaml(path)
    kind = field(cfg, path, "model_kind", str)
    if kind != "transcoder_set":
        raise TranscoderFileError(
            f"{path}: model_kind {kind!r} is not supported; this reader takes per-layer transcoders "
            "('transcoder_set'); cross-layer transcoders ('cross_layer_transcoder') load with load_pretrained"
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
    transcoders: Transcoder | Sequence[Transcoder] | CrossLayerTranscoder,
    directory: str | Path,
    scan: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write `transcoders` (one per layer, layers 0..n-1) as a circuit-tracer 0.5
    transcoder set: `layer_{i}.safetensors` and `config.yaml` in `directory`; a
    `CrossLayerTranscoder` in circuit-tracer's CLT layout (`export_cross_layer`).

    `scan` names the set (circuit-tracer requires one; Neuronpedia uses it to find
    feature pages); default: the directory's name. The config lists the files by
    absolute path, which circuit-tracer's local loader needs; with `repo_id` it lists
    `hf://{repo_id}/layer_{i}.safetensors` instead, for a directory to upload as that
    Hub repository. circuit-tracer runs only ReLU and JumpReLU transcoders whose input
    and output are d_model wide; BatchTopK is written as the JumpReLU it computes in
    eval mode, and TopK is refused. Returns the directory."""
    if isinstance(transcoders, CrossLayerTranscoder):
        return export_cross_layer(transcoders, Path(directory), scan, repo_id)
    if isinstance(transcoders, Transcoder):
        transcoders = [transcoders]
    transcoders = list(transcoders)
    if not transcoders:
        raise TranscoderFileError("export_circuit_tracer: no transcoders given; pass one per layer 0..n-1")
    bad = [type(t).__name__ for t in transcoders if not isinstance(t, Transcoder)]
    if bad:
        raise TranscoderFileError(f"export_circuit_tracer takes Transcoder objects (or one CLT), got a {bad[0]}")
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
    files = {}
    for t in transcoders:
        tensors = {"W_enc": t.W_enc, "W_dec": t.W_dec, "b_enc": t.b_enc, "b_dec": t.b_dec}
        if t.cfg.skip:
            tensors["W_skip"] = t.W_skip
        if t.cfg.activation in ("jumprelu", "batchtopk"):
            tensors["activation_function.threshold"] = t.threshold
        files[f"layer_{t.cfg.layer}.safetensors"] = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    listed = [f"hf://{repo_id}/{name}" if repo_id else str(directory.resolve() / name) for name in files]
    config: dict[str, Any] = {
        "model_kind": "transcoder_set",
        "scan": scan or directory.resolve().name,
        "feature_input_hook": read_hook,
        "feature_output_hook": write_hook,
        "transcoders": listed,
    }
    names = {t.cfg.model_name for t in transcoders}
    if len(names) == 1 and None not in names:
        config["model_name"] = names.pop()
    if input_space is not None:
        config["input_space"] = input_space
    _write_export(directory, transcoders, files, config)
    return directory


# --- cross-layer transcoders ------------------------------------------------------------

CLT_KIND = "cross_layer_transcoder"


def holds_cross_layer(directory: Path) -> bool:
    """Whether `directory` holds a circuit-tracer cross-layer transcoder: its
    `config.yaml` says `model_kind: cross_layer_transcoder`, or (without a config) it
    holds `W_enc_0.safetensors`."""
    path = directory / CONFIG_FILE
    if path.is_file():
        return field(read_yaml(path), path, "model_kind", str) == CLT_KIND
    return (directory / "W_enc_0.safetensors").is_file()


def read_cross_layer(
    directory: Path, input_space: str | None, model_name: str | None, dtype: torch.dtype | None, mmap: bool = False
) -> tuple[CrossLayerConfig, dict[str, Tensor]]:
    """The config and tensors (named as `CrossLayerTranscoder` parameters) of the
    circuit-tracer CLT in `directory`: `W_enc_{i}.safetensors` holding `W_enc_{i}`
    [d_latent, d_model], `b_enc_{i}`, `b_dec_{i}` and, for JumpReLU, `threshold_{i}`;
    `W_dec_{i}.safetensors` holding `W_dec_{i}` [d_latent, n_layers - i, d_model].
    Hooks come from `config.yaml` (circuit-tracer's defaults without one); the input
    space, where the hook's values depend on folding, is `input_space`, or with
    `"auto"` the config's `input_space` (default unfolded, as circuit-tracer runs
    models). With `mmap` the decoders are mapped from their files (`read_tensors`)."""
    path = directory / CONFIG_FILE
    cfg = read_yaml(path) if path.is_file() else {}
    read_hook = field(cfg, path, "feature_input_hook", str, "hook_resid_mid")
    write_hook = field(cfg, path, "feature_output_hook", str, "hook_mlp_out")
    n_layers = len(list(directory.glob("W_enc_*.safetensors")))
    if n_layers == 0 or not all((directory / f"W_enc_{i}.safetensors").is_file() for i in range(n_layers)):
        found = sorted(p.name for p in directory.glob("W_enc_*.safetensors"))
        raise TranscoderFileError(
            f"{directory}: a circuit-tracer cross-layer transcoder holds W_enc_0..W_enc_N.safetensors and "
            f"W_dec_0..W_dec_N.safetensors; found encoder files {found}"
        )
    first = tensor_names(directory / "W_enc_0.safetensors")
    if "W_enc_0" not in first or len(first["W_enc_0"]) != 2:
        raise TranscoderFileError(f"{directory / 'W_enc_0.safetensors'}: no W_enc_0 matrix in it")
    d_latent, d_model = first["W_enc_0"]
    jumprelu = "threshold_0" in first
    tensors: dict[str, list[Tensor]] = {"W_enc": [], "b_enc": [], "b_dec": [], "threshold": []}
    decoders = {}
    for i in range(n_layers):
        shapes = {f"W_enc_{i}": (d_latent, d_model), f"b_enc_{i}": (d_latent,), f"b_dec_{i}": (d_model,)}
        if jumprelu:
            shapes[f"threshold_{i}"] = (d_latent,)
        layer = read_tensors(directory / f"W_enc_{i}.safetensors", shapes)
        for name in tensors:
            if f"{name}_{i}" in layer:
                tensors[name].append(layer[f"{name}_{i}"])
        dec = read_tensors(
            directory / f"W_dec_{i}.safetensors", {f"W_dec_{i}": (d_latent, n_layers - i, d_model)}, mmap=mmap
        )
        decoders[f"W_dec.{i}"] = dec[f"W_dec_{i}"]
    space = input_space
    if space == AUTO:
        ln_space = field(cfg, path, "input_space", str, "unfolded_ln")
        space = ln_space if read_hook.endswith(LN_SITES) else "any"
    try:
        config = CrossLayerConfig(
            d_model=d_model,
            d_latent=d_latent,
            n_layers=n_layers,
            activation="jumprelu" if jumprelu else "relu",
            input_hook=read_hook,
            output_hook=write_hook,
            input_space=space,
            model_name=model_name if model_name is not None else field(cfg, path, "model_name", str, None),
            dtype=str(dtype or tensors["W_enc"][0].dtype).removeprefix("torch."),
        )
    except ConfigError as err:
        raise TranscoderFileError(f"{directory}: {err}") from err
    stacked = {name: torch.stack(values) for name, values in tensors.items() if values}
    return config, {**stacked, **decoders}


def export_cross_layer(clt: CrossLayerTranscoder, directory: Path, scan: str | None, repo_id: str | None) -> Path:
    """Write `clt` in circuit-tracer's CLT layout (see `read_cross_layer`) with a
    `config.yaml`. circuit-tracer's CLT runs ReLU and JumpReLU, from layer 0, without a
    skip term; BatchTopK is written as the JumpReLU it computes in eval mode."""
    c = clt.cfg
    if c.activation == "topk":
        raise TranscoderFileError("circuit-tracer cannot run TopK cross-layer transcoders (only ReLU and JumpReLU)")
    if c.skip:
        raise TranscoderFileError(
            "circuit-tracer's cross-layer transcoder files hold no skip term, so this one cannot be written exactly"
        )
    if c.first_layer != 0:
        raise TranscoderFileError(
            f"circuit-tracer's cross-layer transcoders start at layer 0, this one at {c.first_layer}"
        )
    files = {}
    for i in range(c.n_layers):
        encoder = {f"W_enc_{i}": clt.W_enc[i], f"b_enc_{i}": clt.b_enc[i], f"b_dec_{i}": clt.b_dec[i]}
        if c.activation in ("jumprelu", "batchtopk"):
            encoder[f"threshold_{i}"] = clt.threshold[i]
        for name, tensors in ((f"W_enc_{i}", encoder), (f"W_dec_{i}", {f"W_dec_{i}": clt.W_dec[i]})):
            files[f"{name}.safetensors"] = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    config: dict[str, Any] = {
        "model_kind": CLT_KIND,
        "scan": scan or directory.resolve().name,
        "feature_input_hook": c.input_hook,
        "feature_output_hook": c.output_hook,
    }
    if repo_id:
        config["repo_id"] = repo_id
    if c.model_name:
        config["model_name"] = c.model_name
    if c.input_space is not None:
        config["input_space"] = c.input_space
    _write_export(directory, [clt], files, config)
    return directory


_EXPORTED_FILE = re.compile(r"(layer|W_enc|W_dec)_\d+\.safetensors")
"""The weight files of a circuit-tracer export (transcoder set or CLT)."""


def _write_export(
    directory: Path, modules: Sequence[NativeModule], files: dict[str, dict[str, Tensor]], config: dict[str, Any]
) -> None:
    """Write `files` (name -> tensors) and `config.yaml` as `directory`, replacing an
    earlier export there as a whole (its stale files go with it); refuses NaN or inf
    weights and a directory holding anything but an earlier export, so that nothing of
    the user's is replaced."""
    import yaml

    for module in modules:
        bad = module.nonfinite_parameters()
        if bad:
            raise TranscoderFileError(f"{directory}: not exported, {bad} hold NaN or inf; nothing was written")
    if directory.is_dir():
        foreign = sorted(
            p.name
            for p in directory.iterdir()
            if not (_EXPORTED_FILE.fullmatch(p.name) or (p.name == CONFIG_FILE and _is_export_config(p)))
        )
        if foreign:
            raise TranscoderFileError(
                f"{directory}: not exported, the directory holds other files ({', '.join(foreign[:5])}) that the "
                "export would replace; export into a new directory or one that holds only an earlier export"
            )
    with atomic_directory(directory) as tmp:
        for name, tensors in files.items():
            save_file(tensors, tmp / name)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))


def _is_export_config(path: Path) -> bool:
    """Whether `path` is the `config.yaml` of a circuit-tracer export."""
    try:
        return field(read_yaml(path), path, "model_kind", str, None) in ("transcoder_set", CLT_KIND)
    except TranscoderFileError:
        return False
