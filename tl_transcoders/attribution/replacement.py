"""The frozen replacement model of one prompt (the "Circuit Tracing" method).

Inside `with frozen_replacement(model, transcoders) as state:` a forward pass runs the
model with

- every attention pattern and every norm scale (ln1, ln2, the final norm and Gemma-2
  style post-norms) frozen: attention is frozen through its queries and keys, the one
  hook-based way that works on both model classes (`attn.hook_pattern` is not used by
  the TL 3.x Bridge's own computation), norms through `hook_scale`;
- each MLP output replaced by a constant plus, where a layer is replaced by a
  transcoder (or a cross-layer transcoder) with a skip term, the skip term
  `x @ W_skip.T`: the output's value is unchanged (reconstruction + error), but
  gradients flow only through the skip, never through the MLP or the features;
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
from tl_transcoders.core.placement import AnyTranscoder
from tl_transcoders.core.transcoder import Transcoder
from tl_transcoders.hooks.sites import SiteFn, attach, store_hook
from tl_transcoders.hooks.splice import SpliceError, check_compatible, describe, placements_of, transcoder_list

__all__ = [
    "NORMS",
    "LayerMap",
    "ReplacementError",
    "ReplacementState",
    "check_finite_logits",
    "freeze_hooks",
    "frozen_replacement",
    "frozen_sites",
    "layer_maps",
    "output_site",
    "quiet_norm_edits",
    "record_frozen_values",
    "writers",
]

NORMS = ("ln1", "ln1_post", "ln2", "ln2_post")


class ReplacementError(AttributionError):
    """The transcoders or the input cannot form a replacement model."""


def check_finite_logits(logits: Tensor, source: str) -> None:
    """Refuse NaN or inf `logits` (an `AttributionError` saying that `source` produced
    them), so that no graph, edit or generation is built on them."""
    if not torch.isfinite(logits).all():
        raise AttributionError(
            f"{source} produced NaN or inf logits on this prompt; check the model's and the transcoders' "
            "weights and dtype (fp16 overflows easily)"
        )


@dataclass(frozen=True)
class LayerMap:
    """How the replacement model replaces one layer's MLP: the features that sit at
    this layer are those of `module` (a `Transcoder` for this layer, or the
    `CrossLayerTranscoder` covering it, at `index`), read at `input_site`; the layer's
    output site is replaced by the decoders of every feature that writes into it."""

    layer: int
    module: AnyTranscoder
    index: int
    input_site: str
    output_site: str

    @property
    def W_enc(self) -> Float[Tensor, "d_latent d_in"]:
        """The encoder of this layer's features (detached)."""
        W = self.module.W_enc.detach()
        return W if isinstance(self.module, Transcoder) else W[self.index]

    @property
    def d_latent(self) -> int:
        return self.module.cfg.d_latent

    @property
    def W_skip(self) -> Float[Tensor, "d_out d_in"] | None:
        """The skip term replacing this layer's output, or None."""
        if not self.module.cfg.skip:
            return None
        return self.module.W_skip if isinstance(self.module, Transcoder) else self.module.W_skip[self.index]

    @property
    def b_dec(self) -> Float[Tensor, " d_out"]:
        """The output bias of this layer's reconstruction (detached)."""
        b = self.module.b_dec.detach()
        return b if isinstance(self.module, Transcoder) else b[self.index]

    def decoders(self) -> dict[int, Float[Tensor, "d_latent d_out"]]:
        """This layer's features' decoders (detached), by the layer they write into."""
        if isinstance(self.module, Transcoder):
            return {self.layer: self.module.W_dec.detach()}
        W = self.module.W_dec[self.index].detach()
        return {self.layer + offset: W[:, offset] for offset in range(W.shape[1])}

    def encode_sparse(self, x: Float[Tensor, "*batch d_in"]) -> SparseLatents:
        """The active latents of this layer's features from its input `x`."""
        x = x.to(self.module.W_enc.dtype)
        if isinstance(self.module, Transcoder):
            return self.module.encode_sparse(x)
        return self.module.encode_layer(self.index, x).latents

    def describe(self) -> str:
        return f"{describe(self.module)} at layer {self.layer}"


def layer_maps(model: nn.Module, transcoders: AnyTranscoder | Sequence[AnyTranscoder]) -> dict[int, LayerMap]:
    """Check that `transcoders` (per-layer and cross-layer) fit `model` (as `splice`
    does), replace different layers and are not SAEs; their `LayerMap`s by layer."""
    try:
        transcoders = transcoder_list(transcoders)
    except SpliceError as err:
        raise ReplacementError(str(err)) from err
    if not transcoders:  # a model of error nodes only
        return {}
    try:
        check_compatible(model, transcoders)
    except SpliceError as err:
        raise ReplacementError(str(err)) from err
    maps: dict[int, LayerMap] = {}
    for place in placements_of(transcoders):
        module = place.module
        if place.input_site == place.output_site:
            raise ReplacementError(
                f"{describe(module)} reads and writes the same site (an SAE); the "
                "replacement model needs transcoders, which read an MLP's input and write its output"
            )
        if place.layer in maps:
            raise ReplacementError(
                f"{describe(module)} and {describe(maps[place.layer].module)} replace the same "
                f"layer {place.layer}; give at most one transcoder per layer"
            )
        if module.cfg.activation == "batchtopk" and module.training:
            raise ReplacementError(
                f"{describe(module)} is a BatchTopK transcoder in training mode, which "
                "selects latents across the batch; call transcoder.eval() first"
            )
        maps[place.layer] = LayerMap(place.layer, module, place.index, place.input_site, place.output_site)
    return maps


def writers(maps: dict[int, LayerMap]) -> dict[int, list[tuple[int, Tensor]]]:
    """For each layer, the (source layer, decoder [d_latent, d_out]) pairs of the
    features that write into its output."""
    into: dict[int, list[tuple[int, Tensor]]] = {}
    for source, m in sorted(maps.items()):
        for target, W in m.decoders().items():
            into.setdefault(target, []).append((source, W))
    return into


def output_site(layer: int, by_layer: dict[int, Transcoder] | dict[int, LayerMap]) -> str:
    """The site where layer `layer`'s MLP output (and its error node) lives."""
    entry = by_layer.get(layer)
    if entry is None:
        return f"blocks.{layer}.hook_mlp_out"
    return entry.output_site if isinstance(entry, LayerMap) else entry.cfg.output_site


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

    `embed` is the token-embedding leaf; `inputs[layer]` each replaced layer's feature
    input, where a feature's pre-activation gradient is injected; `outputs[layer]` each
    layer's MLP output, where source gradients are read; `unembed_input` the final
    norm's output, where logit gradients are injected; `residuals[layer]` the residual
    stream after the blocks asked for (`residual_layers`); `queries[layer]` and
    `keys[layer]` the attention queries and keys (`attn.hook_q`, `attn.hook_k`, before
    they are frozen) of the layers asked for (`attention_layers`),
    `[batch, n_pos, heads, d_head]`. The others are `[batch, n_pos, width]`
    and part of the autograd graph. `mlp_outputs[layer]` is the (detached) MLP output
    itself; `maps` how each replaced layer is replaced."""

    maps: dict[int, LayerMap] = field(default_factory=dict)
    embed: Tensor | None = None
    unembed_input: Tensor | None = None
    inputs: dict[int, Tensor] = field(default_factory=dict)
    outputs: dict[int, Tensor] = field(default_factory=dict)
    residuals: dict[int, Tensor] = field(default_factory=dict)
    queries: dict[int, Tensor] = field(default_factory=dict)
    keys: dict[int, Tensor] = field(default_factory=dict)
    mlp_outputs: dict[int, Tensor] = field(default_factory=dict)
    _latents: dict[int, SparseLatents] = field(default_factory=dict)

    def latents(self, layer: int) -> SparseLatents:
        """The active latents of the features at `layer` on the first sequence, `[n_pos, k]`."""
        if layer not in self._latents:
            with torch.no_grad():
                self._latents[layer] = self.maps[layer].encode_sparse(self.inputs[layer][0].detach())
        return self._latents[layer]

    def release_graph(self) -> None:
        """Drop the recorded tensors that hold the forward pass's autograd graph (no
        backward pass can run after this); the latents and MLP outputs stay."""
        self.inputs = {layer: x.detach() for layer, x in self.inputs.items()}
        self.outputs.clear()
        self.residuals.clear()
        self.queries.clear()
        self.keys.clear()
        self.unembed_input = None

    def error(self, layer: int) -> Float[Tensor, "n_pos d_out"]:
        """Layer `layer`'s error vectors on the first sequence: MLP output minus its
        reconstruction (the decoded features writing into it, its bias and skip term);
        the whole MLP output where the layer is not replaced."""
        mlp_out = self.mlp_outputs[layer][0]
        if layer not in self.maps:
            return mlp_out
        m = self.maps[layer]
        with torch.no_grad():
            reconstruction = m.b_dec.to(torch.float64).expand_as(mlp_out).clone()
            for source, W in writers(self.maps).get(layer, []):
                values, indices = self.latents(source)
                # A block of positions at a time: a BOS position can hold most latents.
                step = max(1, (64 << 20) // max(1, indices.shape[-1] * W.shape[-1] * 8))
                for first in range(0, indices.shape[0], step):
                    rows = slice(first, first + step)
                    decoded = torch.einsum("pk,pkd->pd", values[rows].double(), W[indices[rows]].double())
                    reconstruction[rows] += decoded
            if m.W_skip is not None:
                reconstruction += self.inputs[layer][0].detach().double() @ m.W_skip.detach().double().T
        return mlp_out - reconstruction.to(mlp_out.dtype)


@contextlib.contextmanager
def frozen_replacement(
    model: nn.Module,
    transcoders: AnyTranscoder | Sequence[AnyTranscoder],
    residual_layers: Sequence[int] = (),
    attention_layers: Sequence[int] = (),
) -> Iterator[ReplacementState]:
    """Run every forward pass inside the block as the frozen replacement model (see the
    module docstring) and yield the `ReplacementState` it fills (with the residual
    stream after each block of `residual_layers`, and the queries and keys of each
    layer of `attention_layers` as they are computed, before being frozen). Passes must
    run with gradients enabled for the recorded tensors to carry a graph."""
    maps = layer_maps(model, transcoders)
    state = ReplacementState(maps=maps)
    hooks: list[tuple[str, SiteFn]] = [("hook_embed", _embedding_leaf(state))]
    for layer in attention_layers:  # before the hooks that freeze them
        hooks.append((f"blocks.{layer}.attn.hook_q", store_hook(state.queries, layer)))
        hooks.append((f"blocks.{layer}.attn.hook_k", store_hook(state.keys, layer)))
    hooks += freeze_hooks(model)
    for layer in range(model.cfg.n_layers):
        m = maps.get(layer)
        if m is not None:
            hooks.append((m.input_site, store_hook(state.inputs, layer)))
        # The MLP's own computation never carries gradient: only the skip term does.
        hooks.append((f"blocks.{layer}.mlp.hook_in", lambda activation: activation.detach()))
        hooks.append((output_site(layer, maps), _linear_output(state, layer, m)))
    hooks += [(f"blocks.{layer}.hook_resid_post", store_hook(state.residuals, layer)) for layer in residual_layers]
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


def _linear_output(state: ReplacementState, layer: int, m: LayerMap | None) -> SiteFn:
    """Replace the MLP output by itself, detached, plus (skip - skip.detach()) so that
    only the skip term carries gradient; the value stays bit-exact."""

    def hook(activation: Tensor) -> Tensor:
        constant = activation.detach()
        state.mlp_outputs[layer] = constant
        W_skip = m.W_skip if m is not None else None
        if W_skip is not None:
            x = state.inputs[layer].to(W_skip.dtype)
            skip = (x @ W_skip.T).to(activation.dtype)
            out = constant + (skip - skip.detach())
        else:
            out = constant.clone().requires_grad_(True)
        state.outputs[layer] = out
        return out

    return hook
