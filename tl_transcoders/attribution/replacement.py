"""The frozen replacement model of one prompt (the "Circuit Tracing" method).

Inside `with frozen_replacement(model, transcoders) as state:` a forward pass runs the
model with

- every attention pattern and every norm scale (ln1, ln2, the final norm and Gemma-2
  style post-norms) frozen: attention is frozen through its queries and keys, the one
  hook-based way that works on both model classes (`attn.hook_pattern` is not used by
  the TL 3.x Bridge's own computation), norms through `hook_scale`;
- each MLP output replaced by a constant plus, where a layer has a transcoder with a
  skip term, the skip term `x @ W_skip.T`: the output's value is unchanged (transcoder
  output + error), but gradients flow only through the skip, never through the MLP or
  the transcoder's features;
- the token embeddings as a leaf tensor.

So the model is linear in the node values (token embeddings, feature decoder vectors,
error vectors), and a gradient read at an MLP output site or at the embedding is a
direct effect in that linear model. `state` records the tensors to inject and read
gradients at, and after the pass holds each layer's latents and error vectors.

`freeze_hooks` holds attention and norms at recorded values for interventions.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_transcoders.attribution.errors import AttributionError
from tl_transcoders.core.activations import SparseLatents
from tl_transcoders.core.transcoder import Transcoder
from tl_transcoders.hooks.sites import SiteFn, attach, store_hook
from tl_transcoders.hooks.splice import SpliceError, check_compatible, describe

__all__ = [
    "NORMS",
    "ReplacementError",
    "ReplacementState",
    "freeze_hooks",
    "frozen_replacement",
    "frozen_sites",
    "output_site",
    "quiet_norm_edits",
    "record_frozen_values",
    "transcoders_by_layer",
]

NORMS = ("ln1", "ln1_post", "ln2", "ln2_post")


class ReplacementError(AttributionError):
    """The transcoders or the input cannot form a replacement model."""


def transcoders_by_layer(model: nn.Module, transcoders: Sequence[Transcoder]) -> dict[int, Transcoder]:
    """Check that `transcoders` fit `model` (as `splice` does), that each replaces a
    different layer's MLP and is not an SAE, and return them keyed by layer."""
    transcoders = list(transcoders)
    if not transcoders:  # a model of error nodes only
        return {}
    try:
        check_compatible(model, transcoders)
    except SpliceError as err:
        raise ReplacementError(str(err)) from err
    by_layer: dict[int, Transcoder] = {}
    for transcoder in transcoders:
        c = transcoder.cfg
        if c.is_sae:
            raise ReplacementError(
                f"{describe(transcoder)} reads and writes the same site (an SAE); the "
                "replacement model needs transcoders, which read an MLP's input and write its output"
            )
        if c.layer in by_layer:
            raise ReplacementError(
                f"{describe(transcoder)} and {describe(by_layer[c.layer])} replace the same "
                f"layer {c.layer}; give at most one transcoder per layer"
            )
        if c.activation == "batchtopk" and transcoder.training:
            raise ReplacementError(
                f"{describe(transcoder)} is a BatchTopK transcoder in training mode, which "
                "selects latents across the batch; call transcoder.eval() first"
            )
        by_layer[c.layer] = transcoder
    return by_layer


def output_site(layer: int, by_layer: dict[int, Transcoder]) -> str:
    """The site where layer `layer`'s MLP output (and its error node) lives."""
    transcoder = by_layer.get(layer)
    return transcoder.cfg.output_site if transcoder else f"blocks.{layer}.hook_mlp_out"


def frozen_sites(model: nn.Module) -> list[str]:
    """The hook sites held fixed in the replacement model: every norm's scale and every
    attention layer's queries and keys (which fix its pattern)."""
    sites = []
    for layer in range(model.cfg.n_layers):
        sites += [f"blocks.{layer}.{norm}.hook_scale" for norm in NORMS]
        sites += [f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k"]
    sites.append("ln_final.hook_scale")
    names = model.hook_dict  # a property the Bridge rebuilds on every access
    return [site for site in sites if site in names]


def freeze_hooks(model: nn.Module, values: dict[str, Tensor] | None = None) -> list[tuple[str, SiteFn]]:
    """Hooks that freeze attention patterns and norm scales: detached where `values`
    is None, else replaced by `values[site]` (recorded on one sequence, broadcast over
    the batch)."""

    def freeze(site: str) -> SiteFn:
        if values is None:
            return lambda activation: activation.detach()
        return lambda activation: values[site].to(activation.dtype).expand_as(activation).clone()

    return [(site, freeze(site)) for site in frozen_sites(model)]


@contextlib.contextmanager
def quiet_norm_edits() -> Iterator[None]:
    """Silence the Bridge's warning that a hook edited a norm scale (it then rebuilds
    the norm's output from the hooked values, equal up to rounding): freezing the
    scales does so on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
        yield


def record_frozen_values(model: nn.Module) -> tuple[list[tuple[str, SiteFn]], dict[str, Tensor]]:
    """Hooks that record, during a pass, the first value of every frozen site (of the
    first sequence), and the dict they fill."""
    values: dict[str, Tensor] = {}
    hooks = [
        (site, store_hook(values, site, lambda a: a[:1].detach(), keep_first=True)) for site in frozen_sites(model)
    ]
    return hooks, values


@dataclass
class ReplacementState:
    """What a pass of the frozen replacement model recorded (of its last forward pass).

    `embed` is the token-embedding leaf; `inputs[layer]` each transcoder's input, where
    a feature's pre-activation gradient is injected; `outputs[layer]` each layer's MLP
    output, where source gradients are read; `unembed_input` the final norm's output,
    where logit gradients are injected. All are `[batch, n_pos, width]` and part of the
    autograd graph. `mlp_outputs[layer]` is the (detached) MLP output itself;
    `transcoders` the transcoders by layer."""

    transcoders: dict[int, Transcoder] = field(default_factory=dict)
    embed: Tensor | None = None
    unembed_input: Tensor | None = None
    inputs: dict[int, Tensor] = field(default_factory=dict)
    outputs: dict[int, Tensor] = field(default_factory=dict)
    mlp_outputs: dict[int, Tensor] = field(default_factory=dict)

    def latents(self, transcoder: Transcoder) -> SparseLatents:
        """The transcoder's active latents on the first sequence, `[n_pos, k]`."""
        x = self.inputs[transcoder.cfg.layer][0].detach()
        with torch.no_grad():
            return transcoder.encode_sparse(x.to(transcoder.W_enc.dtype))

    def error(self, layer: int, transcoder: Transcoder | None) -> Float[Tensor, "n_pos d_out"]:
        """Layer `layer`'s error vectors on the first sequence: MLP output minus
        transcoder output (the whole MLP output without a transcoder)."""
        mlp_out = self.mlp_outputs[layer][0]
        if transcoder is None:
            return mlp_out
        x = self.inputs[layer][0].detach()
        with torch.no_grad():
            return mlp_out - transcoder(x.to(transcoder.W_enc.dtype)).to(mlp_out.dtype)


@contextlib.contextmanager
def frozen_replacement(model: nn.Module, transcoders: Sequence[Transcoder]) -> Iterator[ReplacementState]:
    """Run every forward pass inside the block as the frozen replacement model (see the
    module docstring) and yield the `ReplacementState` it fills. Passes must run with
    gradients enabled for the recorded tensors to carry a graph."""
    by_layer = transcoders_by_layer(model, transcoders)
    state = ReplacementState(transcoders=by_layer)
    hooks: list[tuple[str, SiteFn]] = [("hook_embed", _embedding_leaf(state))]
    hooks += freeze_hooks(model)
    for layer in range(model.cfg.n_layers):
        transcoder = by_layer.get(layer)
        if transcoder is not None:
            hooks.append((transcoder.cfg.input_site, store_hook(state.inputs, layer)))
        # The MLP's own computation never carries gradient: only the skip term does.
        hooks.append((f"blocks.{layer}.mlp.hook_in", lambda activation: activation.detach()))
        hooks.append((output_site(layer, by_layer), _linear_output(state, layer, transcoder)))
    hooks.append(("unembed.hook_in", _store_unembed_input(state)))
    with attach(model, hooks), quiet_norm_edits():
        yield state


def _embedding_leaf(state: ReplacementState) -> SiteFn:
    def hook(activation: Tensor) -> Tensor:
        state.embed = activation.detach().requires_grad_(True)
        return state.embed

    return hook


def _store_unembed_input(state: ReplacementState) -> SiteFn:
    def hook(activation: Tensor) -> None:
        state.unembed_input = activation

    return hook


def _linear_output(state: ReplacementState, layer: int, transcoder: Transcoder | None) -> SiteFn:
    """Replace the MLP output by itself, detached, plus (skip - skip.detach()) so that
    only the skip term carries gradient; the value stays bit-exact."""

    def hook(activation: Tensor) -> Tensor:
        constant = activation.detach()
        state.mlp_outputs[layer] = constant
        if transcoder is not None and transcoder.cfg.skip:
            x = state.inputs[layer].to(transcoder.W_skip.dtype)
            skip = (x @ transcoder.W_skip.T).to(activation.dtype)
            out = constant + (skip - skip.detach())
        else:
            out = constant.clone().requires_grad_(True)
        state.outputs[layer] = out
        return out

    return hook
