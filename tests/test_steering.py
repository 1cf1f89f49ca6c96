"""generate_steered(): generation with features held, against a hand-written hooked loop."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_PARAMS, build_model
from test_attribute import prompt
from test_interventions import modules_for, replaced_layers

from tl_transcoders.attribution.errors import AttributionError
from tl_transcoders.attribution.interventions import FeatureEdit
from tl_transcoders.attribution.steering import generate_steered
from tl_transcoders.hooks.sites import attach


def hand_written_generation(model, modules, tokens, edits, n_new) -> torch.Tensor:
    """Greedy generation where, in every pass, each edited feature's change (new value
    minus its activation, computed by hand) times its decoders is added to the MLP
    outputs it writes into."""
    layers = replaced_layers(modules)
    n_prompt = tokens.shape[0]
    for _ in range(n_new):
        changes: dict[int, list] = {}

        def read(l):
            def hook(act):
                latents = layers[l]["encode"](act[0])
                for e in edits:
                    if e.layer == l:
                        positions = range(n_prompt, act.shape[1]) if e.position is None else [e.position]
                        for p in positions:
                            new = e.value if e.value is not None else latents[p, e.latent] * e.scale
                            changes.setdefault(l, []).append((p, e.latent, new - latents[p, e.latent]))

            return hook

        def write(t):
            def hook(act):
                act = act.clone()
                for s, spec in layers.items():
                    if t in spec["decoders"]:
                        for p, latent, change in changes.get(s, []):
                            act[0, p] += change * spec["decoders"][t][latent]
                return act

            return hook

        hooks = [(spec["sites"][0], read(l)) for l, spec in layers.items()]
        hooks += [(spec["sites"][1], write(l)) for l, spec in layers.items()]
        with torch.no_grad(), attach(model, hooks):
            logits = model(tokens[None])[0, -1]
        tokens = torch.cat([tokens, logits.argmax().view(1)])
    return tokens


CASES = [("per_layer", name) for name in MODEL_PARAMS] + [
    ("cross_layer", MODEL_PARAMS[0]),
    ("cross_layer", "bridge-llama"),
]


@pytest.mark.parametrize("kind, name", CASES)
def test_steered_generation_matches_a_hand_written_loop(kind, name):
    model = build_model(name)
    modules = modules_for(model, kind, "relu", True)
    tokens = prompt(model)
    plain = generate_steered(model, modules, tokens, [], max_new_tokens=6, stop_at_eos=False)
    assert torch.equal(plain.tokens, hand_written_generation(model, modules, tokens, [], 6))
    assert torch.equal(plain.tokens[: tokens.shape[0]], tokens) and plain.generated.shape == (6,)
    edits = [
        FeatureEdit(0, None, 3, value=40.0),
        FeatureEdit(0, 2, 5, scale=-20.0),
        FeatureEdit(2, None, 1, value=25.0),
    ]
    steered = generate_steered(model, modules, tokens, edits, max_new_tokens=6, stop_at_eos=False)
    assert torch.equal(steered.tokens, hand_written_generation(model, modules, tokens, edits, 6))
    assert not torch.equal(steered.tokens, plain.tokens)  # the edits do change what is generated


def test_unsteered_generation_is_the_models_greedy_continuation():
    model = build_model(MODEL_PARAMS[0])
    tokens = prompt(model)
    out = generate_steered(model, [], tokens, [], max_new_tokens=5, stop_at_eos=False)
    expected = tokens
    for _ in range(5):
        with torch.no_grad():
            expected = torch.cat([expected, model(expected[None])[0, -1].argmax().view(1)])
    assert torch.equal(out.tokens, expected)


def test_sampling_is_reproducible_with_a_seed():
    model = build_model(MODEL_PARAMS[0])
    modules = modules_for(model, "per_layer", "relu", True)
    tokens = prompt(model)
    runs = [generate_steered(model, modules, tokens, [], max_new_tokens=8, temperature=2.0, seed=3) for _ in range(2)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)


def test_bad_steering_input_is_refused_with_a_clear_error():
    model = build_model(MODEL_PARAMS[0])
    modules = modules_for(model, "per_layer", "relu", True)
    tokens = prompt(model)
    with pytest.raises(AttributionError, match="no transcoder replaces layer 1"):
        generate_steered(model, modules, tokens, [FeatureEdit(1, 0, 0, value=1.0)])
    with pytest.raises(AttributionError, match="outside the prompt"):
        generate_steered(model, modules, tokens, [FeatureEdit(0, 7, 0, value=1.0)])
    with pytest.raises(AttributionError, match="latent 999 is out of range"):
        generate_steered(model, modules, tokens, [FeatureEdit(0, None, 999, value=1.0)])
    with pytest.raises(AttributionError, match="exceed the model's context"):
        generate_steered(model, modules, tokens, [], max_new_tokens=model.cfg.n_ctx)
    with pytest.raises(AttributionError, match="temperature"):
        generate_steered(model, modules, tokens, [], temperature=-1.0)
    with pytest.raises(AttributionError, match="for generate_steered"):
        from tl_transcoders.attribution.interventions import intervene

        intervene(model, modules, tokens, [FeatureEdit(0, None, 0, value=1.0)])
