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

from torch import Tensor, nn

from tl_transcoders.core.clt import CrossLayerTranscoder, LayerTargets
from tl_transcoders.core.config import ConfigError, layer_of
from tl_transcoders.core.errors import TranscodersError
from tl_transcoders.core.placement import AnyTranscoder, Placement, describe, placements
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
    "placements_of",
    "splice",
    "spliced_sites",
    "transcoder_hooks",
    "transcoder_list",
]


class SpliceError(TranscodersError, ValueError):
    """A transcoder does not fit the model it is spliced into."""


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()
"""For each model inside `splice`, the sites its active splices write (and by what)."""


def transcoder_list(transcoders: AnyTranscoder | Sequence[AnyTranscoder]) -> list[AnyTranscoder]:
    """`transcoders` as a list (one transcoder is a list of one); `SpliceError` for
    anything that is not a `Transcoder` or a `CrossLayerTranscoder`."""
    if isinstance(transcoders, (str, bytes, os.PathLike)):
        raise SpliceError(f"expected Transcoder objects, got the path {transcoders!r}: load it with Transcoder.load")
    if isinstance(transcoders, nn.Module):
        items = [transcoders]
    else:
        try:
            items = list(transcoders)
        except TypeError:
            raise SpliceError(f"expected a Transcoder or a list of them, got {type(transcoders).__name__}") from None
    bad = [type(t).__name__ for t in items if not isinstance(t, (Transcoder, CrossLayerTranscoder))]
    if bad:
        raise SpliceError(
            f"expected Transcoder or CrossLayerTranscoder objects, got a {bad[0]} (load a saved one with "
            "Transcoder.load or CrossLayerTranscoder.load)"
        )
    return items


def placements_of(transcoders: Sequence[AnyTranscoder]) -> list[Placement]:
    """Every layer the transcoders replace, in the order given."""
    return [p for t in transcoders for p in placements(t)]


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
def eval_mode(transcoders: Sequence[AnyTranscoder]) -> Iterator[None]:
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


_MLP_OUTPUT_SITES = ("hook_mlp_out", "mlp.hook_out")
"""Site names of a block's MLP output: both hold the same tensor."""


def check_compatible(model: nn.Module, transcoders: AnyTranscoder | Sequence[AnyTranscoder]) -> None:
    """Raise `SpliceError`, saying what is wrong and what to do, unless every transcoder
    fits `model`: its config is valid and matches its parameters (also after a change),
    its layers are in range, its sites exist and fire (input no later than output), its
    widths match theirs, its input space and model name match the model's, its weights
    are finite, it is on the model's device, and no two transcoders write one site."""
    check_model(model)
    transcoders = transcoder_list(transcoders)
    for transcoder in transcoders:
        _check_module(model, transcoder)
    seen_outputs: dict[str, AnyTranscoder] = {}
    mlp_writers: dict[int, AnyTranscoder] = {}
    n_layers = model.cfg.n_layers
    for place in placements_of(transcoders):
        name = describe(place.module)
        if not 0 <= place.layer < n_layers:
            raise SpliceError(
                f"{name}: layer {place.layer} is out of range, the model has {n_layers} layers (0..{n_layers - 1})"
            )
        for site in (place.input_site, place.output_site):
            site_layer = layer_of(site)
            if site_layer is not None and site_layer != place.layer:
                raise SpliceError(
                    f"{name}: site {site} is in block {site_layer}, not in the transcoder's layer {place.layer}"
                )
        if place.output_site in seen_outputs:
            raise SpliceError(
                f"{name} and {describe(seen_outputs[place.output_site])} both "
                f"write {place.output_site}; splice at most one transcoder per site"
            )
        seen_outputs[place.output_site] = place.module
        if place.output_site.endswith(_MLP_OUTPUT_SITES):  # aliases of one tensor: the later write wins
            if place.layer in mlp_writers:
                raise SpliceError(
                    f"{name} and {describe(mlp_writers[place.layer])} both replace the MLP output of the same "
                    f"layer {place.layer}; splice at most one transcoder per MLP"
                )
            mlp_writers[place.layer] = place.module

    every = placements_of(transcoders)
    try:
        info = probe_sites(model, [s for p in every for s in (p.input_site, p.output_site)])
    except SiteError as err:
        raise SpliceError(str(err)) from err
    for place in every:
        name = describe(place.module)
        read, write = info[place.input_site], info[place.output_site]
        if read.order > write.order:
            raise SpliceError(
                f"{name}: the input site {place.input_site} fires after the output site, "
                "so the output cannot be computed from the input"
            )
        widths = ("d_in", "d_out") if isinstance(place.module, Transcoder) else ("d_model", "d_model")
        for what, width, site, expected in (
            (widths[0], read.width, place.input_site, place.d_in),
            (widths[1], write.width, place.output_site, place.d_out),
        ):
            if width != expected:
                raise SpliceError(
                    f"{name}: {what}={expected} but {site} has width "
                    f"{width} on this model; the transcoder was made for another model "
                    "or another site"
                )
        _check_input_space(model, place)


def _check_module(model: nn.Module, transcoder: AnyTranscoder) -> None:
    """The checks of `check_compatible` that concern the module as a whole: config and
    shapes, model name, finite weights, device."""
    name = describe(transcoder)
    try:
        transcoder.validate()
    except ConfigError as err:
        raise SpliceError(f"{name}: {err}") from err
    trained_on, this_model = transcoder.cfg.model_name, model_name(model)
    if trained_on and this_model and trained_on != this_model:
        raise SpliceError(
            f"{name} was trained on model {trained_on!r}, not on "
            f"{this_model!r}. If this is the same model under another name, set "
            "transcoder.cfg.model_name = None to skip this check."
        )
    bad = transcoder.nonfinite_parameters()
    if bad:
        raise SpliceError(
            f"{name} has NaN or inf in {bad}; a training run diverged or the weights were damaged: "
            "load a good checkpoint"
        )
    device = transcoder.W_enc.device
    if device != model_device(model):
        raise SpliceError(
            f"{name} is on {device} but the model is on "
            f"{model_device(model)}: call transcoder.to({str(model_device(model))!r})"
        )


def _check_input_space(model: nn.Module, place: Placement) -> None:
    transcoder = place.module
    trained_in = transcoder.cfg.input_space
    here = input_space_of(model, place.input_site)
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
            f"{place.input_site} of this model is in {here!r}: {fix}"
        )


def transcoder_hooks(transcoders: Sequence[AnyTranscoder], error_term: bool = False) -> list[tuple[str, SiteFn]]:
    """The (site, fn) pairs that splice `transcoders`: for each layer a transcoder
    replaces, one that captures its input and one that replaces its output. A
    cross-layer transcoder's layer l is computed from the inputs of layer l and of the
    covered layers before it, as they occur in the spliced forward pass."""
    hooks: list[tuple[str, SiteFn]] = []
    for transcoder in transcoders:
        state: dict = {}
        for place in placements(transcoder):
            hooks.append((place.input_site, _capture(state, place.index)))
            hooks.append((place.output_site, _replace(place, state, error_term)))
    return hooks


def _capture(state: dict, index: int) -> SiteFn:
    def capture(activation: Tensor) -> None:
        state[index] = activation

    return capture


def _reconstruct(place: Placement, state: dict, x: Tensor) -> Tensor:
    """The module's reconstruction of `place`'s output from its input `x`: a
    cross-layer transcoder adds its layer's decoders to the contributions of the
    layers before it (kept in `state`, started afresh at its first layer)."""
    module = place.module
    if isinstance(module, Transcoder):
        return module(x)
    if place.index == 0:
        state["targets"] = LayerTargets(module.cfg.n_layers)
    if "targets" not in state:
        raise RuntimeError(f"{describe(module)}: layer {place.layer} fired before its first layer in this forward pass")
    output, _ = module.step(place.index, x, state["targets"], return_latents=False)
    if place.index == module.cfg.n_layers - 1:
        del state["targets"]
    return output


def _replace(place: Placement, state: dict, error_term: bool) -> SiteFn:
    dtype = place.module.W_enc.dtype

    def replace(activation: Tensor) -> Tensor:
        x = state.pop(place.index, None)
        if x is None:
            raise RuntimeError(
                f"{describe(place.module)}: the output site {place.output_site} fired without its input site "
                "firing first in this forward pass"
            )
        out = _reconstruct(place, state, x.to(dtype)).to(activation.dtype)
        if error_term:
            # Equal to `out + (activation - out).detach()` in value and gradient, but
            # bit-exact: the value is `activation` plus an exact zero.
            return activation + (out - out.detach())
        return out

    return replace


@contextlib.contextmanager
def splice(
    model: nn.Module, transcoders: AnyTranscoder | Sequence[AnyTranscoder], error_term: bool = False
) -> Iterator[nn.Module]:
    """Replace the output of each transcoder's MLP with the transcoder's output for the
    length of the `with` block (yields the model).

    Args:
        model: a `HookedTransformer` or `TransformerBridge`.
        transcoders: one transcoder or several (per-layer or cross-layer), at most one
            per output site; each knows its layers and sites.
        error_term: add back the detached error `original - transcoder(x)`, so outputs
            equal the clean model's while gradients flow through the transcoders.

    Raises `SpliceError` before running anything if a transcoder does not fit (the
    check is one 2-token forward pass, which hooks already on the model also see) or
    writes a site that an enclosing splice already replaces."""
    transcoders = transcoder_list(transcoders)
    check_compatible(model, transcoders)
    active = _ACTIVE.setdefault(model, {})
    every = placements_of(transcoders)
    for place in every:
        if place.output_site in active:
            raise SpliceError(
                f"{describe(place.module)} writes {place.output_site}, which the enclosing splice() already "
                f"replaces with its {active[place.output_site]}; splice both in one call, or leave the outer "
                "splice first"
            )
    written = {p.output_site: describe(p.module) for p in every}
    with eval_mode(transcoders), attach(model, transcoder_hooks(transcoders, error_term)):
        active.update(written)
        try:
            yield model
        finally:
            for site in written:
                active.pop(site, None)
