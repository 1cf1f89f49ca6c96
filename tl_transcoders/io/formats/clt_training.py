"""EleutherAI clt-training (github EleutherAI/clt-training, a fork of sparsify that
installs as `eai-sparsify` 1.1.3): a training run's directory holding the run's
`config.json` and one sparsify-style directory per hookpoint (`layers.{i}.mlp/cfg.json`
+ `sae.safetensors`) whose coder decodes into that layer and the next `n_targets - 1`
(`n_targets > 0`). Read as a `CrossLayerTranscoder`, every fixed rescaling folded into
its weights (see docs/interop.md)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from tl_transcoders.core.config import ConfigError, CrossLayerConfig
from tl_transcoders.core.native import TranscoderFileError, read_tensors
from tl_transcoders.io.formats.common import LN_SITES, field, read_json, tensor_names
from tl_transcoders.io.formats.sparsify import FILES, hookpoint_sites

__all__ = ["RUN_CONFIG", "holds_cross_layer", "is_layer", "read_cross_layer"]

RUN_CONFIG = "config.json"
"""The training run's `TrainConfig`, next to the hookpoint directories."""


def _layer_config(directory: Path) -> dict[str, Any] | None:
    """The `cfg.json` of `directory` when it holds one layer of a clt-training CLT (a
    transcoder with `n_targets > 0`), else None."""
    path = directory / FILES[0]
    if not (path.is_file() and (directory / FILES[1]).is_file()):
        return None
    cfg = read_json(path)
    if field(cfg, path, "transcode", bool, False) and field(cfg, path, "n_targets", int, 0) > 0:
        return cfg
    return None


def is_layer(directory: Path) -> bool:
    """Whether `directory` holds one layer of a clt-training cross-layer transcoder."""
    return _layer_config(directory) is not None


def holds_cross_layer(directory: Path) -> bool:
    """Whether `directory` is a clt-training run: a subdirectory holds one layer of a
    cross-layer transcoder."""
    return directory.is_dir() and any(d.is_dir() and is_layer(d) for d in directory.iterdir())


class _Layer(NamedTuple):
    """One hookpoint's coder: its directory, config, layer number and sites."""

    directory: Path
    cfg: dict[str, Any]
    layer: int
    input_site: str
    output_site: str


def _layers(directory: Path) -> list[_Layer]:
    """The run's coders in training order: the run config's `hookpoints` when it has
    them, else by layer number. Refuses a run whose coders read other modules' inputs
    (`hookpoints_in`), mix in coders that are not cross-layer, or name modules whose
    TransformerLens sites are unknown."""
    run_path = directory / RUN_CONFIG
    run = read_json(run_path) if run_path.is_file() else {}
    if field(run, run_path, "hookpoints_in", list, []):
        raise TranscoderFileError(
            f"{run_path}: hookpoints_in is not supported (each coder reads another module's "
            "input than the one whose output it writes)"
        )
    found = {}
    for d in sorted(d for d in directory.iterdir() if d.is_dir() and (d / FILES[0]).is_file()):
        cfg = _layer_config(d)
        if cfg is None:
            raise TranscoderFileError(
                f"{d / FILES[0]}: not a cross-layer transcoder (transcode and n_targets > 0), "
                f"but the other directories of {directory} are"
            )
        layer, input_site, output_site = hookpoint_sites(d.name, transcode=True)
        if layer is None or input_site is None or output_site is None:
            raise TranscoderFileError(
                f"{d}: cannot tell which TransformerLens hooks the hookpoint {d.name!r} maps to "
                "(clt-training CLTs load from MLP hookpoints such as layers.N.mlp)"
            )
        found[d.name] = _Layer(d, cfg, layer, input_site, output_site)
    order = field(run, run_path, "hookpoints", list, [])
    if not all(isinstance(name, str) for name in order):
        raise TranscoderFileError(f"{run_path}: hookpoints must be a list of hookpoint names (strings), got {order}")
    if sorted(order) == sorted(found):
        return [found[name] for name in order]
    return sorted(found.values(), key=lambda t: t.layer)


def _refuse_unsupported(path: Path, cfg: dict[str, Any], n_targets: int) -> None:
    """Raise `TranscoderFileError` for a coder whose computation `CrossLayerTranscoder`
    cannot reproduce."""
    activation = field(cfg, path, "activation", str, "topk")
    if activation != "topk":
        why = {
            "batchtopk": "clt-training selects its latents across the whole batch, with no per-token rule at inference",
            "groupmax": "there is no GroupMax activation here",
        }.get(activation, "only 'topk' has an equivalent here")
        raise TranscoderFileError(f"{path}: activation {activation!r} is not supported ({why})")
    coalesce = field(cfg, path, "coalesce_topk", str, "none")
    if coalesce != "none":
        raise TranscoderFileError(
            f"{path}: coalesce_topk={coalesce!r} is not supported (a TopK over the latents of several "
            "layers together; here each layer selects its own)"
        )
    if field(cfg, path, "secondary_target_tied", bool, False):
        raise TranscoderFileError(
            f"{path}: secondary_target_tied is not supported (decoders tied per target as well as per source)"
        )
    if field(cfg, path, "use_fp8", bool, False):
        raise TranscoderFileError(f"{path}: use_fp8 is not supported (FP8 encoder products compute differently)")
    if field(cfg, path, "skip_connection", bool, False) and n_targets > 1:
        raise TranscoderFileError(
            f"{path}: skip connections into later layers (W_skips.{{j}}, j > 0) are not supported: a "
            "CrossLayerTranscoder's skip term reads only the layer's own input"
        )


def _read_layer(t: _Layer, d_latent: int, d_model: int) -> dict[str, Tensor]:
    """The tensors of one coder, checked against its config; missing `post_encs` and
    `post_enc_scales` are filled in as the library fills them (zeros; ones for target 0,
    zeros after). Non-zero `post_encs` are refused."""
    path, cfg = t.directory / FILES[1], t.cfg
    n_targets = cfg["n_targets"]
    names = tensor_names(path)
    targets = range(n_targets)
    tied = field(cfg, path, "per_source_tied", bool, False)
    required = {"encoder.weight": (d_latent, d_model), "encoder.bias": (d_latent,)}
    required.update({f"b_decs.{j}": (d_model,) for j in targets})
    required.update({"W_dec": (d_latent, d_model)} if tied else {f"W_decs.{j}": (d_latent, d_model) for j in targets})
    if field(cfg, path, "skip_connection", bool, False):
        required["W_skips.0"] = (d_model, d_model)
    if field(cfg, path, "normalize_io", bool, False):
        required.update(in_norm=(1,), out_norm=(1,))
    optional = {"W_dec": (d_latent, d_model), "b_dec": (d_model,), "W_skip": (d_model, d_model)}
    optional.update({f"post_encs.{j}": (d_latent,) for j in targets})
    if field(cfg, path, "post_encoder_scale", bool, False):
        optional.update({f"post_enc_scales.{j}": (d_latent,) for j in targets})
    shapes = {**required, **{n: s for n, s in optional.items() if n in names and n not in required}}
    tensors = read_tensors(path, shapes)
    for j in targets:
        post = tensors.get(f"post_encs.{j}")
        if post is not None and post.any():
            raise TranscoderFileError(
                f"{path}: post_encs.{j} is non-zero, which cannot be represented: the library adds it to each "
                f"active latent before decoding into layer {t.layer + j} (a jump that depends on which "
                "latents fire, per target); only zero post_encs load"
            )
    return tensors


def read_cross_layer(
    directory: Path, dtype: torch.dtype | None
) -> tuple[CrossLayerConfig, dict[str, Float[Tensor, "*dims"]]]:
    """The config and tensors (named as `CrossLayerTranscoder` parameters) of the
    clt-training run in `directory`. Layer i's coder decodes into layers i ..
    i + n_targets - 1 with `W_decs.{j}` (`W_dec` for every target when
    `per_source_tied`), adding `b_decs.{j}`; decoders past its window are zero, the
    biases into a layer are summed, `normalize_io` (input times sqrt(d) / `in_norm`,
    output times `out_norm` / sqrt(d)), `post_enc_scales` and `divide_cross_layer` are
    folded into the weights. The input space is that of the Hugging Face model it was
    trained on (`unfolded_ln` for the MLP's own input)."""
    layers = _layers(directory)
    if not layers:
        raise TranscoderFileError(f"{directory}: no clt-training hookpoint directories ({' + '.join(FILES)}) in it")
    first = layers[0]
    numbers = [t.layer for t in layers]
    if numbers != list(range(first.layer, first.layer + len(layers))):
        raise TranscoderFileError(
            f"{directory}: the hookpoints cover layers {numbers}; a CrossLayerTranscoder covers consecutive "
            "layers in order"
        )
    n = len(layers)
    d_model = field(first.cfg, first.directory / FILES[0], "d_in", int)
    shape = {}
    for i, t in enumerate(layers):
        path = t.directory / FILES[0]
        expansion = field(t.cfg, path, "expansion_factor", int, 32)
        d_latent = field(t.cfg, path, "num_latents", int, 0) or d_model * expansion
        prefix = f"blocks.{t.layer}."
        here = {
            "d_in": field(t.cfg, path, "d_in", int),
            "d_latent": d_latent,
            "k": field(t.cfg, path, "k", int),
            "skip_connection": field(t.cfg, path, "skip_connection", bool, False),
            "sites": (t.input_site.removeprefix(prefix), t.output_site.removeprefix(prefix)),
        }
        for name, value in here.items():
            if shape.setdefault(name, value) != value:
                raise TranscoderFileError(
                    f"{path}: {name} is {value!r} here but {shape[name]!r} in {first.directory.name}; a "
                    "CrossLayerTranscoder has the same shape, k and hooks in every layer"
                )
        n_targets = t.cfg["n_targets"]
        if not 1 <= n_targets <= n - i:
            raise TranscoderFileError(f"{path}: n_targets={n_targets}, but {n - i} layers start here")
        _refuse_unsupported(path, t.cfg, n_targets)
    d_latent = shape["d_latent"]
    raw = [_read_layer(t, d_latent, d_model) for t in layers]

    def flag(t: _Layer, name: str) -> bool:
        return field(t.cfg, t.directory / FILES[0], name, bool, False)

    for t, r in zip(layers, raw):
        if flag(t, "normalize_io") and not all(
            bool(r[name].isfinite().all() and (r[name] > 0).all()) for name in ("in_norm", "out_norm")
        ):
            raise TranscoderFileError(
                f"{t.directory}: normalize_io is on but in_norm / out_norm are not positive finite numbers "
                f"({r['in_norm'].tolist()}, {r['out_norm'].tolist()}): the run's normalisation cannot be folded"
            )
    root_d = math.sqrt(d_model)
    in_scale = [root_d / r["in_norm"].double() if flag(t, "normalize_io") else 1.0 for t, r in zip(layers, raw)]
    out_scale = [r["out_norm"].double() / root_d if flag(t, "normalize_io") else 1.0 for t, r in zip(layers, raw)]
    sources = [sum(1 for i in range(t + 1) if i + layers[i].cfg["n_targets"] > t) for t in range(n)]
    divide = [max(1, sources[t] - 1) if flag(layers[t], "divide_cross_layer") else 1 for t in range(n)]
    b_dec = [torch.zeros(d_model, dtype=torch.float64) for _ in range(n)]
    decoders = {}
    for i, (t, r) in enumerate(zip(layers, raw)):
        W = torch.zeros(d_latent, n - i, d_model, dtype=torch.float64)
        for j in range(t.cfg["n_targets"]):
            target = i + j
            share = out_scale[target] / (divide[target] if j > 0 else 1)
            decoder = (r["W_dec"] if flag(t, "per_source_tied") else r[f"W_decs.{j}"]).double()
            scale = r.get(f"post_enc_scales.{j}")
            if flag(t, "post_encoder_scale"):  # absent: the library's initial ones for j = 0, zeros after
                scale = scale.double() if scale is not None else torch.full((d_latent,), float(j == 0))
                decoder = decoder * scale[:, None]
            W[:, j] = decoder * share
            b_dec[target] += r[f"b_decs.{j}"].double() * share
        decoders[f"W_dec.{i}"] = W
    tensors = {
        "W_enc": torch.stack([r["encoder.weight"].double() * s for r, s in zip(raw, in_scale)]),
        "b_enc": torch.stack([r["encoder.bias"] for r in raw]),
        "b_dec": torch.stack(b_dec),
        **decoders,
    }
    skip = flag(first, "skip_connection")
    if skip:
        tensors["W_skip"] = torch.stack([r["W_skips.0"].double() * i * o for r, i, o in zip(raw, in_scale, out_scale)])
    file_dtype = raw[0]["encoder.weight"].dtype
    tensors = {name: value.to(file_dtype) for name, value in tensors.items()}
    input_hook, output_hook = shape["sites"]
    try:
        config = CrossLayerConfig(
            d_model=d_model,
            d_latent=d_latent,
            n_layers=n,
            first_layer=first.layer,
            activation="topk",
            k=shape["k"],
            skip=skip,
            input_hook=input_hook,
            output_hook=output_hook,
            input_space="unfolded_ln" if first.input_site.endswith(LN_SITES) else "any",
            dtype=str(dtype or file_dtype).removeprefix("torch."),
        )
    except ConfigError as err:
        raise TranscoderFileError(f"{directory}: {err}") from err
    return config, tensors
