"""What an attribution graph explains: its target nodes.

By default `attribute` explains the most probable next tokens' logits. Given `targets=`,
it explains instead, each as one target node whose row holds every source's direct
effect on it in the frozen replacement model:

    LogitTarget(token)                        the logit of `token` at the last position,
                                              minus the mean logit (as the default targets)
    LogitDifference(token, other)             logit(token) - logit(other) at the last
                                              position: "why this token rather than that one"
    ResidualDirection(layer, position, d)     d . the residual stream after block `layer` at
                                              `position` (a probe's direction, say)
    FeaturePreActivation(layer, position, l)  the pre-activation (without bias) of latent `l`
                                              of the transcoder at `layer`, at `position`:
                                              trace a feature backwards, active or not

Tokens may be given as ids or as strings that the model's tokenizer reads as one token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_transcoders.attribution.errors import AttributionError

__all__ = [
    "FeaturePreActivation",
    "LogitDifference",
    "LogitTarget",
    "ResidualDirection",
    "Target",
    "check_targets",
    "target_record",
]


@dataclass(frozen=True)
class LogitTarget:
    """The demeaned logit of `token` at the last position."""

    token: int | str


@dataclass(frozen=True)
class LogitDifference:
    """The logit of `token` minus that of `other`, at the last position."""

    token: int | str
    other: int | str


@dataclass(frozen=True, eq=False)
class ResidualDirection:
    """`direction` (`[d_model]`) dotted with the residual stream after block `layer`
    (`blocks.{layer}.hook_resid_post`) at `position`; `label` names it in the graph."""

    layer: int
    position: int
    direction: Float[Tensor, " d_model"]
    label: str = "direction"


@dataclass(frozen=True)
class FeaturePreActivation:
    """The pre-activation, without its bias, of latent `latent` of the transcoder
    replacing layer `layer`, at `position`."""

    layer: int
    position: int
    latent: int


Target: TypeAlias = LogitTarget | LogitDifference | ResidualDirection | FeaturePreActivation
"""One target node of an attribution graph."""


def _token_id(model: nn.Module, token: int | str, what: str) -> int:
    """`token` as a vocabulary id (a string must be exactly one token of the model's tokenizer)."""
    if isinstance(token, str):
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise AttributionError(f"{what}: {token!r} is a string but the model has no tokenizer; give a token id")
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise AttributionError(
                f"{what}: {token!r} is {len(ids)} tokens for this tokenizer ({ids}); a target names one token"
            )
        unknown = getattr(tokenizer, "unk_token_id", None)
        if ids[0] == unknown and token != tokenizer.unk_token:
            raise AttributionError(
                f"{what}: {token!r} is not in the tokenizer's vocabulary (it encodes to the unknown token "
                f"{tokenizer.unk_token!r}); name a token the model has, or give its id"
            )
        token = ids[0]
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < model.cfg.d_vocab:
        raise AttributionError(f"{what}: token {token!r} is not an id in the vocabulary of {model.cfg.d_vocab}")
    return token


def _index(value: Any, bound: int, name: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < bound:
        raise AttributionError(f"{what}: {name} {value!r} is out of range [0, {bound})")


def check_targets(
    model: nn.Module, targets: Any, n_pos: int, feature_layers: dict[int, int]
) -> list[LogitTarget | LogitDifference | ResidualDirection | FeaturePreActivation]:
    """The targets with their tokens as ids, after checking each against the model, the
    prompt's `n_pos` positions and `feature_layers` (latents per replaced layer);
    `AttributionError` naming the first bad one."""
    if isinstance(targets, (str, bytes)) or not hasattr(targets, "__iter__"):
        raise AttributionError(f"targets must be a list of targets (LogitTarget, ...), got {type(targets).__name__}")
    checked = []
    for target in targets:
        what = f"target {target!r}"
        if isinstance(target, LogitTarget):
            checked.append(LogitTarget(_token_id(model, target.token, what)))
        elif isinstance(target, LogitDifference):
            pair = (_token_id(model, target.token, what), _token_id(model, target.other, what))
            if pair[0] == pair[1]:
                raise AttributionError(f"{what}: the two tokens are the same, so the difference is zero")
            checked.append(LogitDifference(*pair))
        elif isinstance(target, ResidualDirection):
            _index(target.layer, model.cfg.n_layers, "layer", what)
            _index(target.position, n_pos, "position", what)
            d = target.direction
            if not isinstance(d, Tensor) or tuple(d.shape) != (model.cfg.d_model,) or not d.is_floating_point():
                raise AttributionError(f"{what}: direction must be a float tensor of shape [{model.cfg.d_model}]")
            if not torch.isfinite(d).all():
                raise AttributionError(f"{what}: direction holds NaN or inf")
            checked.append(target)
        elif isinstance(target, FeaturePreActivation):
            if target.layer not in feature_layers:
                raise AttributionError(
                    f"{what}: no transcoder replaces layer {target.layer}; transcoders are at layers "
                    f"{sorted(feature_layers)}"
                )
            _index(target.position, n_pos, "position", what)
            _index(target.latent, feature_layers[target.layer], "latent", what)
            checked.append(target)
        else:
            raise AttributionError(
                f"{what} is not a target: use LogitTarget, LogitDifference, ResidualDirection or FeaturePreActivation"
            )
    if not checked:
        raise AttributionError("targets is empty: give at least one target, or None for the top logits")
    return checked


def target_record(target: Target, tokenizer: Any | None = None) -> dict[str, Any]:
    """A JSON-serialisable description of a (checked) target, with a readable `label`."""

    def name(token: int) -> str:
        return repr(tokenizer.decode([token])) if tokenizer is not None else f"#{token}"

    if isinstance(target, LogitTarget):
        return {"kind": "logit", "token": target.token, "label": f"logit {name(target.token)}"}
    if isinstance(target, LogitDifference):
        label = f"logit {name(target.token)} - {name(target.other)}"
        return {"kind": "logit_difference", "token": target.token, "other": target.other, "label": label}
    if isinstance(target, ResidualDirection):
        direction = [float(v) for v in target.direction.detach().cpu().tolist()]
        norm = math.sqrt(sum(v * v for v in direction))
        return {
            "kind": "residual",
            "layer": target.layer,
            "position": target.position,
            "direction": direction,
            "label": f"{target.label} after block {target.layer} at {target.position} (norm {norm:.3g})",
        }
    return {
        "kind": "feature",
        "layer": target.layer,
        "position": target.position,
        "latent": target.latent,
        "label": f"pre-activation L{target.layer} #{target.latent} at {target.position}",
    }
