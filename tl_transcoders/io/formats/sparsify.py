"""EleutherAI sparsify (`eai-sparsify` 1.x): a directory named after the Hugging Face
module (the hookpoint) holding `cfg.json` and `sae.safetensors`."""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

from tl_transcoders.core.native import TranscoderFileError, read_tensors
from tl_transcoders.io.formats.common import Placement, Source, field, fold_input_shift, read_json

__all__ = ["FILES", "hookpoint_sites", "source"]

FILES = ("cfg.json", "sae.safetensors")
"""The config and weights files of one sparse coder."""

_HF_HOOKPOINT = re.compile(r"^(?:[\w.]*\.)?(?:layers|layer|h|blocks|block)\.(\d+)(?:\.(\w+))?$")
_HF_MLP = ("mlp", "feed_forward", "ffn", "ff")


def hookpoint_sites(hookpoint: str, transcode: bool) -> tuple[int | None, str | None, str | None]:
    """`(layer, input_site, output_site)` for a Hugging Face module name as sparsify uses
    it (`layers.N.mlp`, `model.layers.N.mlp`, `h.N.mlp`, `layers.N`, ...); None where the
    name does not say.

    A transcoder on module M reads M's input and writes its output: for an MLP
    `blocks.N.mlp.hook_in` -> `blocks.N.mlp.hook_out` (before any post-MLP norm), for a
    whole layer `blocks.N.hook_resid_pre` -> `blocks.N.hook_resid_post`. An SAE reads and
    writes M's output."""
    match = _HF_HOOKPOINT.match(hookpoint)
    if match is None:
        return None, None, None
    layer, module = int(match.group(1)), match.group(2)
    if module in _HF_MLP:
        read, write = "mlp.hook_in", "mlp.hook_out"
    elif module is None:
        read, write = "hook_resid_pre", "hook_resid_post"
    else:
        return layer, None, None
    return layer, f"blocks.{layer}.{read if transcode else write}", f"blocks.{layer}.{write}"


def source(directory: Path, placement: Placement) -> Source:
    """The sparse coder in `directory` (named after its hookpoint)."""
    path = directory / FILES[0]
    cfg = read_json(path)
    activation = field(cfg, path, "activation", str, "topk")
    if activation != "topk":
        raise TranscoderFileError(
            f"{path}: sparsify activation {activation!r} is not supported (only 'topk' has an equivalent here)"
        )
    d_in = field(cfg, path, "d_in", int)
    d_latent = field(cfg, path, "num_latents", int, 0) or d_in * field(cfg, path, "expansion_factor", int, 32)
    transcode = field(cfg, path, "transcode", bool, False)
    skip = field(cfg, path, "skip_connection", bool, False)
    if skip and not transcode:
        raise TranscoderFileError(
            f"{path}: an SAE with a skip connection cannot be represented (an SAE here has no skip term)"
        )
    layer, input_site, output_site = hookpoint_sites(directory.name, transcode)
    config = placement.config(
        path,
        d_in=d_in,
        d_out=d_in,
        d_latent=d_latent,
        activation="topk",
        k=field(cfg, path, "k", int),
        skip=skip,
        layer=layer,
        input_site=input_site,
        output_site=output_site,
        ln_space="unfolded_ln",
    )

    def read() -> dict[str, Tensor]:
        shapes = {
            "encoder.weight": (d_latent, d_in),
            "encoder.bias": (d_latent,),
            "W_dec": (d_latent, d_in),
            "b_dec": (d_in,),
        }
        if skip:
            shapes["W_skip"] = (d_in, d_in)
        t = read_tensors(directory / FILES[1], shapes)
        W_enc, b_enc = t.pop("encoder.weight"), t.pop("encoder.bias")
        if not transcode:  # sparsify's SAE encodes x - b_dec: fold that into b_enc
            b_enc = fold_input_shift(W_enc, b_enc, t["b_dec"])
        return {"W_enc": W_enc, "b_enc": b_enc, **t}

    return Source(config, read, directory)
