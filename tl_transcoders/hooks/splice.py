"""`splice`: run a model with transcoders in place of its MLPs.

Inside `with splice(model, transcoders):` every forward pass captures each transcoder's
input at its input site and replaces the activation at its output site with the
transcoder's output. With `error_term=True` the replaced activation is
`transcoder(x) + (original - transcoder(x)).detach()`: the model's outputs are
unchanged while gradients flow through the transcoders. Only hooks are used; on exit
(also after an exception) every hook is removed and the model is as before.

Splices may nest, but two may not write one site: the inner one would silently win.
Functions that need the clean model (`evaluate_splice`, `attribute`, ...) refuse to run
inside a splice (`check_not_spliced`). A BatchTopK transcoder in training mode selects
latents across the batch; splicing runs it with its per-token inference threshold
(`eval_mode`), with a warning.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from tl_transcoders.core.config import ConfigError, layer_of
from tl_transcoders.core.errors import TranscodersError
from tl_transcoders.core.transcoder import Transcoder
from tl_transcoders.hooks.sites import (
    SiteError,
    SiteFn,
    attach,
    check_model,
    input_space_of,
    model_device,
    model_name,
    probe_sites,
)

__all__ = [
    "SpliceError",
    "check_compatible",
    "check_not_spliced",
    "describe",
    "eval_mode",
    "splice",
    "spliced_sites",
    "transcoder_hooks",
    "transcoder_list",
]


class SpliceError(TranscodersError, ValueError):
    """A transcoder does not fit the model it is spliced into."""


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()
"""For each model inside `splice`, the sites its active splices write (and by what)."""


def transcoder_list(transcoders: Transcoder | Sequence[Transcoder]) -> list[Transcoder]:
    """`transcoders` as a list (one transcoder is a list of one); `SpliceError` for
    anything that is not a transcoder."""
    if isinstance(transcoders, (str, bytes, os.PathLike)):
        raise SpliceError(f"expected Transcoder objects, got the path {transcoders!r}: load it with Transcoder.load")
    if isinstance(transcoders, nn.Module):
        items = [transcoders]
    else:
        try:
            items = list(transcoders)
        except TypeError:
            raise SpliceError(f"expected a Transcoder or a list of them, got {type(transcoders).__name__}") from None
    bad = [type(t).__name__ for t in items if not isinstance(t, Transcoder)]
    if bad:
        raise SpliceError(f"expected Transcoder objects, got a {bad[0]} (load a saved one with Transcoder.load)")
    return items


def spliced_sites(model: nn.Module) -> dict[str, str]:
    """The sites active `splice` blocks on `model` write, each with what writes it."""
    return dict(_ACTIVE.get(model, {}))


def check_not_spliced(model: nn.Module, what: str) -> None:
    """Raise `SpliceError` if `model` is inside a `splice` block: `what` needs the clean
    model (its own MLPs) to compare against."""
    check_model(model)
    active = spliced_sites(model)
    if active:
        raise SpliceError(
            f"{what} needs the clean model, but it is called inside splice(), which replaces "
            f"{sorted(active)}; call it outside the `with splice(...)` block (it splices by itself)"
        )


@contextlib.contextmanager
def eval_mode(transcoders: Sequence[Transcoder]) -> Iterator[None]:
    """Run the block with every BatchTopK transcoder that is in training mode switched
    to eval mode (its per-token inference threshold), with a warning, and restore its
    mode after. In training mode BatchTopK selects latents across the whole batch, so a
    token's output would depend on the other tokens; the other activations do not depend
    on the mode."""
    switched = [t for t in transcoders if t.training and t.cfg.activation == "batchtopk"]
    for transcoder in switched:
        warnings.warn(
            f"{describe(transcoder)} is a BatchTopK transcoder in training mode; using its per-token "
            "inference threshold here (call transcoder.eval() to silence this warning)",
            stacklevel=4,
        )
        transcoder.eval()
    try:
        yield
    finally:
        for transcoder in switched:
            transcoder.train()


def describe(transcoder: Transcoder) -> str:
    """A short name for error messages: layer and sites."""
    c = transcoder.cfg
    return f"transcoder for layer {c.layer} ({c.input_site} -> {c.output_site})"


def check_compatible(model: nn.Module, transcoders: Transcoder | Sequence[Transcoder]) -> None:
    """Raise `SpliceError`, saying what is wrong and what to do, unless every transcoder
    fits `model`: its config is valid and matches its parameters (also after a change),
    its layer is in range, its sites exist and fire (input no later than output), its
    widths match theirs, its input space and model name match the model's, its weights
    are finite, it is on the model's device, and no two transcoders write one site."""
    check_model(model)
    transcoders = transcoder_list(transcoders)
    for transcoder in transcoders:
        try:
            transcoder.validate()
        except ConfigError as err:
            raise SpliceError(f"{describe(transcoder)}: {err}") from err
    seen_outputs: dict[str, Transcoder] = {}
    n_layers = model.cfg.n_layers
    for transcoder in transcoders:
        c = transcoder.cfg
        if not 0 <= c.layer < n_layers:
            raise SpliceError(
                f"{describe(transcoder)}: layer {c.layer} is out of range, "
                f"the model has {n_layers} layers (0..{n_layers - 1})"
            )
        for site in (c.input_site, c.output_site):
            site_layer = layer_of(site)
            if site_layer is not None and site_layer != c.layer:
                raise SpliceError(
                    f"{describe(transcoder)}: site {site} is in block {site_layer}, "
                    f"not in the transcoder's layer {c.layer}"
                )
        if c.output_site in seen_outputs:
            raise SpliceError(
                f"{describe(transcoder)} and {describe(seen_outputs[c.output_site])} both "
                f"write {c.output_site}; splice at most one transcoder per site"
            )
        seen_outputs[c.output_site] = transcoder
        trained_on, this_model = c.model_name, model_name(model)
        if trained_on and this_model and trained_on != this_model:
            raise SpliceError(
                f"{describe(transcoder)} was trained on model {trained_on!r}, not on "
                f"{this_model!r}. If this is the same model under another name, set "
                "transcoder.cfg.model_name = None to skip this check."
            )
        bad = [name for name, p in transcoder.named_parameters() if not p.is_meta and not torch.isfinite(p).all()]
        if bad:
            raise SpliceError(
                f"{describe(transcoder)} has NaN or inf in {bad}; a training run diverged "
                "or the weights were damaged: load a good checkpoint"
            )
        device = transcoder.W_enc.device
        if device != model_device(model):
            raise SpliceError(
                f"{describe(transcoder)} is on {device} but the model is on "
                f"{model_device(model)}: call transcoder.to({str(model_device(model))!r})"
            )

    sites = [s for t in transcoders for s in (t.cfg.input_site, t.cfg.output_site)]
    try:
        info = probe_sites(model, sites)
    except SiteError as err:
        raise SpliceError(str(err)) from err
    for transcoder in transcoders:
        c = transcoder.cfg
        read, write = info[c.input_site], info[c.output_site]
        if read.order > write.order:
            raise SpliceError(
                f"{describe(transcoder)}: the input site fires after the output site, "
                "so the output cannot be computed from the input"
            )
        for name, width, site in (("d_in", read.width, c.input_site), ("d_out", write.width, c.output_site)):
            expected = getattr(c, name)
            if width != expected:
                raise SpliceError(
                    f"{describe(transcoder)}: {name}={expected} but {site} has width "
                    f"{width} on this model; the transcoder was made for another model "
                    "or another site"
                )
        _check_input_space(model, transcoder)


def _check_input_space(model: nn.Module, transcoder: Transcoder) -> None:
    trained_in = transcoder.cfg.input_space
    here = input_space_of(model, transcoder.cfg.input_site)
    if trained_in is None:
        warnings.warn(
            f"{describe(transcoder)} does not record its input space, so splice cannot "
            "check it matches the model (folded or unfolded layer norm). Set "
            "transcoder.cfg.input_space to silence this warning.",
            stacklevel=4,
        )
    elif "any" not in (trained_in, here) and trained_in != here:
        fix = {
            "folded_ln": "load the model with fold_ln=True (HookedTransformer.from_pretrained) "
            "or call bridge.enable_compatibility_mode()",
            "unfolded_ln": "load the model without weight processing "
            "(HookedTransformer.from_pretrained_no_processing, or a Bridge without "
            "compatibility mode)",
        }.get(trained_in, "use a model with the same normalisation")
        raise SpliceError(
            f"{describe(transcoder)} was trained in input space {trained_in!r} but "
            f"{transcoder.cfg.input_site} of this model is in {here!r}: {fix}"
        )


def transcoder_hooks(transcoders: Sequence[Transcoder], error_term: bool = False) -> list[tuple[str, SiteFn]]:
    """The (site, fn) pairs that splice `transcoders`: for each, one that captures its
    input and one that replaces its output."""
    hooks: list[tuple[str, SiteFn]] = []
    for transcoder in transcoders:
        captured: dict[str, Tensor] = {}
        hooks.append((transcoder.cfg.input_site, _capture(captured)))
        hooks.append((transcoder.cfg.output_site, _replace(transcoder, captured, error_term)))
    return hooks


def _capture(captured: dict[str, Tensor]) -> SiteFn:
    def capture(activation: Tensor) -> None:
        captured["x"] = activation

    return capture


def _replace(transcoder: Transcoder, captured: dict[str, Tensor], error_term: bool) -> SiteFn:
    dtype = transcoder.W_enc.dtype

    def replace(activation: Tensor) -> Tensor:
        x = captured.pop("x", None)
        if x is None:
            raise RuntimeError(
                f"{describe(transcoder)}: the output site fired without its input site "
                "firing first in this forward pass"
            )
        out = transcoder(x.to(dtype)).to(activation.dtype)
        if error_term:
            # Equal to `out + (activation - out).detach()` in value and gradient, but
            # bit-exact: the value is `activation` plus an exact zero.
            return activation + (out - out.detach())
        return out

    return replace


@contextlib.contextmanager
def splice(
    model: nn.Module, transcoders: Transcoder | Sequence[Transcoder], error_term: bool = False
) -> Iterator[nn.Module]:
    """Replace the output of each transcoder's MLP with the transcoder's output for the
    length of the `with` block (yields the model).

    Args:
        model: a `HookedTransformer` or `TransformerBridge`.
        transcoders: one transcoder or several, at most one per output site; each knows
            its layer and sites.
        error_term: add back the detached error `original - transcoder(x)`, so outputs
            equal the clean model's while gradients flow through the transcoders.

    Raises `SpliceError` before running anything if a transcoder does not fit (the
    check is one 2-token forward pass, which hooks already on the model also see) or
    writes a site that an enclosing splice already replaces."""
    transcoders = transcoder_list(transcoders)
    check_compatible(model, transcoders)
    active = _ACTIVE.setdefault(model, {})
    for transcoder in transcoders:
        site = transcoder.cfg.output_site
        if site in active:
            raise SpliceError(
                f"{describe(transcoder)} writes {site}, which the enclosing splice() already replaces "
                f"with its {active[site]}; splice both in one call, or leave the outer splice first"
            )
    written = {t.cfg.output_site: describe(t) for t in transcoders}
    with eval_mode(transcoders), attach(model, transcoder_hooks(transcoders, error_term)):
        active.update(written)
        try:
            yield model
        finally:
            for site in written:
                active.pop(site, None)
