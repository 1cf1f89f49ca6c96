"""SAELens 6: `cfg.json` + `sae_weights.safetensors` (`SAE.save_model`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from tl_transcoders.core.config import layer_of
from tl_transcoders.core.native import TranscoderFileError, read_tensors
from tl_transcoders.io.formats.common import Placement, Source, field, fold_input_shift, read_json, tensor_names

__all__ = ["ARCHITECTURES", "FILES", "source"]

FILES = ("cfg.json", "sae_weights.safetensors")
"""The config and weights files of one SAE or transcoder."""

ARCHITECTURES = {
    # architecture: (activation, transcoder, skip)
    "standard": ("relu", False, False),
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "transcoder": ("relu", True, False),
    "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}


def source(directory: Path, placement: Placement) -> Source:
    """The SAE or transcoder in `directory`, with every SAELens-specific step folded into
    plain weights (see docs/interop.md)."""
    path = directory / FILES[0]
    cfg = read_json(path)
    metadata = field(cfg, path, "metadata", dict, {})

    def meta(name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        """A field of the config or, in SAELens 6, of its metadata."""
        value = field(cfg, path, name, kind, None)
        return value if value is not None else field(metadata, path, name, kind, default)

    architecture = field(cfg, path, "architecture", str, "standard")
    if architecture not in ARCHITECTURES:
        raise TranscoderFileError(
            f"{path}: SAELens architecture {architecture!r} is not supported; supported: {sorted(ARCHITECTURES)}"
        )
    activation, is_transcoder, skip = ARCHITECTURES[architecture]
    normalize = field(cfg, path, "normalize_activations", str, "none")
    if normalize != "none":
        raise TranscoderFileError(
            f"{path}: normalize_activations={normalize!r} cannot be represented exactly (it "
            "rescales each input at run time). Fold it with SAELens first (for "
            "'expected_average_only_in': sae.fold_activation_norm_scaling_factor(factor), "
            "then sae.save_model) or use SAELens to run this SAE."
        )
    reshape = field(cfg, path, "reshape_activations", str, "none")
    if reshape != "none":
        raise TranscoderFileError(f"{path}: reshape_activations={reshape!r} (per-head inputs) is not supported")
    old_activation = meta("activation_fn_str", str) or meta("activation_fn", str)  # before SAELens 6
    if old_activation not in (None, "relu") or meta("finetuning_scaling_factor", bool):
        raise TranscoderFileError(
            f"{path}: a pre-6.0 SAELens config with activation {old_activation!r} or a "
            "finetuning scaling factor is not supported; load it with SAELens and save_model it"
        )
    for name in ("hook_head_index", "hook_head_index_out"):
        if meta(name, int) is not None:
            raise TranscoderFileError(f"{path}: per-head SAEs ({name}) are not supported")
    d_in, d_sae = field(cfg, path, "d_in", int), field(cfg, path, "d_sae", int)
    d_out = field(cfg, path, "d_out", int) if is_transcoder else d_in
    k = field(cfg, path, "k", int) if activation == "topk" else None
    rescale = activation == "topk" and field(cfg, path, "rescale_acts_by_decoder_norm", bool, False)
    apply_b_dec = not is_transcoder and field(cfg, path, "apply_b_dec_to_input", bool, True)
    hook_name = meta("hook_name", str) or meta("hook_point", str)
    hook_out = meta("hook_name_out", str) if is_transcoder else hook_name
    layer = layer_of(hook_name) if hook_name else meta("hook_layer", int)
    kwargs = meta("model_from_pretrained_kwargs", dict, {})
    folded = kwargs.get("fold_ln", True) is not False
    config = placement.config(
        path,
        d_in=d_in,
        d_out=d_out,
        d_latent=d_sae,
        activation=activation,
        k=k,
        skip=skip,
        layer=layer,
        input_site=hook_name,
        output_site=hook_out,
        ln_space="folded_ln" if folded else "unfolded_ln",
        model_name=meta("model_name", str),
    )

    def read() -> dict[str, Tensor]:
        weights = directory / FILES[1]
        shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
        # older JumpReLU files store log_threshold; SAELens loads exp() of it
        log_threshold = activation == "jumprelu" and "log_threshold" in tensor_names(weights)
        if activation == "jumprelu":
            shapes["log_threshold" if log_threshold else "threshold"] = (d_sae,)
        if skip:
            shapes["W_skip"] = (d_out, d_in)
        t = read_tensors(weights, shapes)
        if log_threshold:
            t["threshold"] = t.pop("log_threshold").exp()
        t["W_enc"] = t["W_enc"].T
        if apply_b_dec:  # SAELens encodes x - b_dec
            t["b_enc"] = fold_input_shift(t["W_enc"], t["b_enc"], t["b_dec"])
        if rescale:  # pre-activations scaled by, latents divided by, each decoder row's norm
            norms = t["W_dec"].norm(dim=-1)
            t["W_enc"], t["b_enc"] = t["W_enc"] * norms[:, None], t["b_enc"] * norms
            t["W_dec"] = t["W_dec"] / norms[:, None]
        if activation == "jumprelu":  # relu(pre) * (pre > t) == pre * (pre > max(t, 0))
            t["threshold"] = t["threshold"].clamp(min=0)
        return t

    return Source(config, read, directory)
