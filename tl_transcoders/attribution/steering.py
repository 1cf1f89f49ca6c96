"""`generate_steered`: generate text with transcoder features set or scaled.

Each generated token comes from a forward pass of the whole sequence so far with the
edits held: at every replaced layer the features are computed from the layer's input
in that pass, the edited ones are set (`value=`) or multiplied (`scale=`), and the
change of their decoded output is added to the MLP output of every layer their
decoders write into (the layer itself for a per-layer transcoder, that layer and every
later covered one for a cross-layer transcoder). Everything else runs as in the model
itself: attention is free, the MLPs are the model's own, so with no edit the tokens
are the model's own greedy continuation.

An edit at a prompt position (`FeatureEdit(layer, position, latent, ...)`) holds at that
position in every pass; one with `position=None` holds at every newly generated
position. Works with both TransformerLens model classes, through hooks
only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor, nn

from tl_transcoders.attribution.errors import AttributionError
from tl_transcoders.attribution.interventions import FeatureEdit, check_edit_targets
from tl_transcoders.attribution.replacement import LayerMap, check_finite_logits, layer_maps, writers
from tl_transcoders.core.placement import AnyTranscoder
from tl_transcoders.hooks.sites import SiteFn, attach
from tl_transcoders.hooks.splice import check_not_spliced
from tl_transcoders.hooks.tokens import prompt_tokens

__all__ = ["SteeredGeneration", "generate_steered"]


@dataclass
class SteeredGeneration:
    """The prompt's tokens followed by the generated ones (`tokens`), how many came
    from the prompt, and the generated text where the model has a tokenizer."""

    tokens: Int[Tensor, " n_pos"]
    n_prompt: int
    text: str | None

    @property
    def generated(self) -> Int[Tensor, " n_new"]:
        return self.tokens[self.n_prompt :]


def generate_steered(
    model: nn.Module,
    transcoders: AnyTranscoder | Sequence[AnyTranscoder],
    prompt_or_tokens: str | Tensor,
    edits: FeatureEdit | Sequence[FeatureEdit],
    *,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int | None = None,
    stop_at_eos: bool = True,
) -> SteeredGeneration:
    """Generate up to `max_new_tokens` tokens after the prompt with `edits` held (see the
    module docstring): greedy with `temperature` 0, else sampled from the softmax of the
    logits over `temperature` (with a generator seeded by `seed`). Stops after the
    tokenizer's end-of-text token when `stop_at_eos`.

    Raises `AttributionError` for an edit at a layer without a transcoder, a position
    outside the prompt, a latent out of range, or a generation longer than the model's
    context."""
    check_not_spliced(model, "generate_steered")
    tokens = prompt_tokens(model, prompt_or_tokens)
    maps = layer_maps(model, transcoders)
    n_prompt = int(tokens.shape[0])
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise AttributionError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if n_prompt + max_new_tokens > model.cfg.n_ctx:
        raise AttributionError(
            f"{n_prompt} prompt tokens + max_new_tokens={max_new_tokens} exceed the model's context of "
            f"{model.cfg.n_ctx} positions; lower max_new_tokens or shorten the prompt"
        )
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise AttributionError(f"temperature must be a finite number >= 0, got {temperature!r}")
    edits = check_edit_targets(edits, maps, n_prompt, generating=True)
    generator = torch.Generator(device=tokens.device)
    if seed is not None:
        generator.manual_seed(seed)
    tokenizer = getattr(model, "tokenizer", None)
    eos = getattr(tokenizer, "eos_token_id", None) if stop_at_eos and tokenizer is not None else None
    into = writers(maps)
    for _ in range(max_new_tokens):
        changes: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}
        hooks: list[tuple[str, SiteFn]] = []
        for m in maps.values():
            hooks.append((m.input_site, _edit_features(m, edits, n_prompt, changes)))
        for target in sorted(into):
            hooks.append((maps[target].output_site, _add_changes(into[target], changes)))
        with torch.no_grad(), attach(model, hooks):
            logits = model(tokens[None])[0, -1].float()
        check_finite_logits(logits, "the steered model")
        if temperature == 0:
            new = logits.argmax()
        else:
            new = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)[0]
        tokens = torch.cat([tokens, new.view(1).to(tokens.dtype)])
        if eos is not None and int(new) == eos:
            break
    text = tokenizer.decode(tokens[n_prompt:].tolist()) if tokenizer is not None else None
    return SteeredGeneration(tokens, n_prompt, text)


def _edit_features(
    m: LayerMap, edits: Sequence[FeatureEdit], n_prompt: int, changes: dict[int, list[tuple[Tensor, Tensor, Tensor]]]
) -> SiteFn:
    """A hook on `m`'s input site that records, for each edit at its layer, the change
    (new - current activation) at the positions it holds, as (positions, latents,
    changes)."""
    layer = m.layer
    mine = [edit for edit in edits if edit.layer == layer]

    def hook(activation: Tensor) -> None:
        if not mine:
            return
        n_pos = activation.shape[1]
        latents = m.encode_sparse(activation[0]).to_dense(m.d_latent)
        found = []
        for edit in mine:
            positions = torch.arange(n_prompt, n_pos) if edit.position is None else torch.tensor([edit.position])
            positions = positions.to(latents.device)
            current = latents[positions, edit.latent]
            new = torch.full_like(current, edit.value) if edit.value is not None else current * edit.scale
            found.append((positions, torch.full_like(positions, edit.latent), new - current))
        changes[layer] = found

    return hook


def _add_changes(sources: list[tuple[int, Tensor]], changes: dict[int, list[tuple[Tensor, Tensor, Tensor]]]) -> SiteFn:
    """A hook on an output site that adds the decoded changes of the edited features of
    every source layer writing into it (`sources`: (layer, decoder) pairs)."""

    def hook(activation: Tensor) -> Tensor | None:
        out = None
        for source, W in sources:
            for positions, latents, change in changes.get(source, []):
                if out is None:
                    out = activation.clone()
                delta = change[:, None].to(W.dtype) * W[latents]
                out[0].index_add_(0, positions, delta.to(out.dtype))
        return out

    return hook
