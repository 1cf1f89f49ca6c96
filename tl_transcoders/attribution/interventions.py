"""`intervene`: set, scale or zero transcoder features and see how the logits change.

The model runs with its transcoders spliced in: each replaced layer's MLP output is its
reconstruction (from the edited latents of every feature writing into it: the layer's
own for a per-layer transcoder, those of that layer and every earlier covered one for a
cross-layer transcoder) plus its error on the clean prompt, held constant. With
`freeze_attention` the attention patterns and norm scales are held at their clean
values (as in the attribution graph's replacement model); with `constrained_layers` the
features of those layers (other than the edited ones) keep their clean activations and
layers without a transcoder keep their clean MLP output.
Freezing attention and constraining every layer leaves a model that is linear in the
features, where the change of a demeaned logit is exactly the graph's edge.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_transcoders.attribution.errors import AttributionError
from tl_transcoders.attribution.replacement import (
    LayerMap,
    check_finite_logits,
    freeze_hooks,
    layer_maps,
    output_site,
    quiet_norm_edits,
    record_frozen_values,
    writers,
)
from tl_transcoders.core.placement import AnyTranscoder
from tl_transcoders.hooks.sites import SiteFn, attach, store_hook
from tl_transcoders.hooks.splice import check_not_spliced
from tl_transcoders.hooks.tokens import prompt_tokens

__all__ = [
    "FeatureEdit",
    "InterventionResult",
    "intervene",
    "zero",
]


@dataclass(frozen=True)
class FeatureEdit:
    """Set one feature's activation at one position to `value`, or multiply it by
    `scale`; exactly one of the two is given. `position=None` edits every newly
    generated position (`generate_steered` only)."""

    layer: int
    position: int | None
    latent: int
    value: float | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.scale is None):
            raise AttributionError(f"{self}: give exactly one of value= (set) or scale= (multiply)")
        number = self.value if self.value is not None else self.scale
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise AttributionError(f"{self}: the value or scale must be a finite number, got {number!r}")
        for name in ("layer", "position", "latent"):
            if name == "position" and self.position is None:
                continue
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise AttributionError(f"{self}: {name} must be an integer, got {getattr(self, name)!r}")


def zero(layer: int, position: int, latent: int) -> FeatureEdit:
    """An edit that switches one feature off at one position."""
    return FeatureEdit(layer, position, latent, value=0.0)


@dataclass
class InterventionResult:
    """Logits before and after the edits, and the last position's largest changes."""

    original_logits: Float[Tensor, "n_pos d_vocab"]
    new_logits: Float[Tensor, "n_pos d_vocab"]
    top_tokens: Int[Tensor, " n_top"]  # the tokens whose last-position logit moved most
    top_changes: Float[Tensor, " n_top"]  # their change (new - original)

    @property
    def change(self) -> Float[Tensor, "n_pos d_vocab"]:
        return self.new_logits - self.original_logits


def intervene(
    model: nn.Module,
    transcoders: AnyTranscoder | Sequence[AnyTranscoder],
    prompt_or_tokens: str | Tensor,
    edits: FeatureEdit | Sequence[FeatureEdit],
    *,
    freeze_attention: bool = True,
    constrained_layers: Iterable[int] | None = None,
    n_top: int = 10,
) -> InterventionResult:
    """Run the prompt with `edits` applied to the spliced transcoders (see the module
    docstring) and compare the logits with the clean model's.

    `transcoders` are per-layer and cross-layer transcoders, at most one per layer (as
    for `attribute`). A cross-layer transcoder's feature is edited at its source layer
    (`edit.layer`), and the edit reaches every layer its decoders write into.

    Raises `AttributionError` for an edit at a layer without a transcoder, a position or
    latent out of range, or a zero/scale edit of a feature that is not active there."""
    check_not_spliced(model, "intervene")
    tokens = prompt_tokens(model, prompt_or_tokens)
    maps = layer_maps(model, transcoders)
    constrained = set(constrained_layers or ())
    bad = sorted(layer for layer in constrained if not 0 <= layer < model.cfg.n_layers)
    if bad:
        raise AttributionError(f"constrained_layers {bad} are out of range: the model has {model.cfg.n_layers} layers")
    clean = _clean_pass(model, maps, tokens)
    check_finite_logits(clean.logits, "the model")
    edits = _check_edits(edits, maps, clean.latents, tokens.numel())
    hooks = freeze_hooks(model, clean.frozen) if freeze_attention else []
    inputs: dict[int, Tensor] = {}
    latents: dict[int, Tensor] = {}
    into = writers(maps)
    for layer in range(model.cfg.n_layers):
        m = maps.get(layer)
        site = output_site(layer, maps)
        if m is not None:
            fixed = clean.latents[layer] if layer in constrained else None
            layer_edits = [edit for edit in edits if edit.layer == layer]
            hooks.append((m.input_site, _edited_latents(m, inputs, latents, fixed, layer_edits)))
            hooks.append((site, _replaced_output(m, into.get(layer, []), inputs, latents, clean.errors[layer])))
        elif layer in constrained:
            hooks.append((site, _constant(clean.outputs[layer])))
    with torch.no_grad(), attach(model, hooks), quiet_norm_edits():
        new_logits = model(tokens[None])[0]
    if not torch.isfinite(new_logits).all():
        raise AttributionError(
            "the edited model produced NaN or inf logits: an edit's value or scale is too large for "
            f"the model's dtype ({new_logits.dtype}); use a smaller one"
        )
    original = clean.logits
    change = (new_logits - original)[-1]
    top = change.abs().topk(min(n_top, change.numel())).indices
    return InterventionResult(original, new_logits, top, change[top])


@dataclass
class _CleanPass:
    """The clean prompt's logits, frozen-site values, MLP outputs (by layer), and for
    each replaced layer its features' dense latents and its error."""

    logits: Tensor
    frozen: dict[str, Tensor]
    outputs: dict[int, Tensor]
    latents: dict[int, Tensor]
    errors: dict[int, Tensor]


def _clean_pass(model: nn.Module, maps: dict[int, LayerMap], tokens: Tensor) -> _CleanPass:
    hooks, frozen = record_frozen_values(model)
    inputs: dict[int, Tensor] = {}
    outputs: dict[int, Tensor] = {}
    for layer in range(model.cfg.n_layers):
        if layer in maps:
            hooks.append((maps[layer].input_site, store_hook(inputs, layer)))
        hooks.append((output_site(layer, maps), store_hook(outputs, layer)))
    with torch.no_grad(), attach(model, hooks):
        logits = model(tokens[None])[0]
        latents = {layer: _dense_latents(m, inputs[layer]) for layer, m in maps.items()}
        into = writers(maps)
        errors = {
            layer: outputs[layer] - _reconstruction(m, into.get(layer, []), inputs, latents).to(outputs[layer].dtype)
            for layer, m in maps.items()
        }
    return _CleanPass(logits, frozen, outputs, latents, errors)


def check_edit_targets(
    edits: FeatureEdit | Sequence[FeatureEdit], maps: dict[int, LayerMap], n_prompt: int, *, generating: bool
) -> list[FeatureEdit]:
    """`edits` as a list (one edit is a list of one), after refusing any that is not a
    `FeatureEdit` or names a layer without a transcoder, a position outside the prompt's
    `n_prompt` tokens or a latent out of range. `position=None` (every newly generated
    position) is allowed only when `generating`."""
    if isinstance(edits, FeatureEdit):
        edits = [edits]
    elif isinstance(edits, (str, bytes)) or not isinstance(edits, Iterable):
        raise AttributionError(f"edits must be a FeatureEdit or a list of them, got {type(edits).__name__}")
    edits = list(edits)
    for edit in edits:
        if not isinstance(edit, FeatureEdit):
            raise AttributionError(f"edits must be FeatureEdit objects (see zero()), got {type(edit).__name__}")
        if edit.layer not in maps:
            raise AttributionError(
                f"{edit}: no transcoder replaces layer {edit.layer}; transcoders are at layers {sorted(maps)}"
            )
        if edit.position is None and not generating:
            raise AttributionError(f"{edit}: position=None (every generated position) is for generate_steered")
        if edit.position is not None and not 0 <= edit.position < n_prompt:
            raise AttributionError(
                f"{edit}: position {edit.position} is out of range, outside the prompt's {n_prompt} tokens"
                + ("; use position=None to edit every newly generated position" if generating else "")
            )
        d_latent = maps[edit.layer].d_latent
        if not 0 <= edit.latent < d_latent:
            raise AttributionError(
                f"{edit}: latent {edit.latent} is out of range, the transcoder has {d_latent} latents"
            )
    return edits


def _check_edits(
    edits: FeatureEdit | Sequence[FeatureEdit], maps: dict[int, LayerMap], latents: dict[int, Tensor], n_pos: int
) -> list[FeatureEdit]:
    """`check_edit_targets` for `intervene`, which also refuses zeroing or scaling a
    feature that is not active (it would change nothing)."""
    edits = check_edit_targets(edits, maps, n_pos, generating=False)
    for edit in edits:
        inactive = latents[edit.layer][0, edit.position, edit.latent] == 0
        if (edit.scale is not None or edit.value == 0) and inactive:
            raise AttributionError(
                f"{edit}: the feature is not active at position {edit.position} of this prompt, so "
                "zeroing or scaling it changes nothing; set it with value= to switch it on"
            )
    return edits


def _constant(value: Tensor) -> SiteFn:
    return lambda activation: value.expand_as(activation)


def _dense_latents(m: LayerMap, x: Float[Tensor, "batch n_pos d_in"]) -> Float[Tensor, "batch n_pos d_latent"]:
    """The latents of the features at `m`'s layer from its input `x`, dense."""
    return m.encode_sparse(x).to_dense(m.d_latent)


def _reconstruction(
    m: LayerMap,
    sources: list[tuple[int, Tensor]],
    inputs: dict[int, Tensor],
    latents: dict[int, Tensor],
) -> Float[Tensor, "batch n_pos d_out"]:
    """Layer `m.layer`'s reconstruction: the decoded `latents` of every source layer
    writing into it (`sources`: (layer, decoder) pairs, as `writers` gives them), its
    bias and its skip term from `inputs[m.layer]`."""
    out = m.b_dec
    for source, W in sources:
        out = out + latents[source] @ W
    if m.W_skip is not None:
        x = inputs[m.layer].to(m.W_skip.dtype)
        out = out + x @ m.W_skip.T
    return out


def _edited_latents(
    m: LayerMap,
    inputs: dict[int, Tensor],
    latents: dict[int, Tensor],
    fixed: Tensor | None,
    edits: list[FeatureEdit],
) -> SiteFn:
    """A hook on `m`'s input site that stores the input and this pass's latents of the
    features at its layer (from the input, or the `fixed` clean latents), with `edits`
    applied."""
    layer = m.layer

    def hook(activation: Tensor) -> None:
        inputs[layer] = activation
        current = (_dense_latents(m, activation) if fixed is None else fixed).clone()
        for edit in edits:
            value = current[:, edit.position, edit.latent]
            current[:, edit.position, edit.latent] = edit.value if edit.value is not None else value * edit.scale
        latents[layer] = current

    return hook


def _replaced_output(
    m: LayerMap,
    sources: list[tuple[int, Tensor]],
    inputs: dict[int, Tensor],
    latents: dict[int, Tensor],
    error: Tensor,
) -> SiteFn:
    """A hook on `m`'s output site that writes this pass's reconstruction (from the
    edited latents of every source layer writing into it) plus the clean `error`."""

    def hook(activation: Tensor) -> Tensor:
        return _reconstruction(m, sources, inputs, latents).to(activation.dtype) + error

    return hook
