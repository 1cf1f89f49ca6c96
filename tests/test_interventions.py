"""intervene(): feature edits against the attribution graph and a hand-written run."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_PARAMS, build_model, make_clt
from test_attribute import CASES, CLT_CASES, float64_model, prompt, transcoders_for

from tl_transcoders.attribution.attribute import attribute
from tl_transcoders.attribution.interventions import FeatureEdit, intervene, zero
from tl_transcoders.hooks.sites import attach

# The reference runs also edit norm scales, which the Bridge reports on every pass.
pytestmark = pytest.mark.filterwarnings("ignore:A forward hook edited hook_scale")


def demeaned(model, logits: torch.Tensor) -> torch.Tensor:
    """Last-position logits before any soft-cap, minus their mean."""
    cap = getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0
    last = logits[-1]
    if cap > 0:
        last = cap * torch.atanh(last / cap)
    return last - last.mean()


def modules_for(model, kind: str, activation: str, skip: bool) -> list:
    """Per-layer transcoders at layers 0 and 2, or one cross-layer transcoder over 0..2,
    in the model's dtype."""
    if kind == "per_layer":
        return transcoders_for(model, activation, skip)
    dtype = next(model.parameters()).dtype
    clt = make_clt(model, layers=[0, 1, 2], activation=activation, skip=skip).to(dtype)
    clt.cfg.dtype = str(dtype).removeprefix("torch.")
    return [clt]


KIND_CASES = [("per_layer", *case) for case in CASES] + [("cross_layer", *case) for case in CLT_CASES]


@pytest.mark.parametrize("kind, name, activation, skip", KIND_CASES)
def test_frozen_linear_edit_changes_logits_by_the_graph_edge(kind, name, activation, skip):
    model = float64_model(name)
    transcoders = modules_for(model, kind, activation, skip)
    tokens = prompt(model)
    graph = attribute(model, transcoders, tokens, max_feature_nodes=1)  # the most influential feature
    logit_rows = graph.adjacency[-graph.n_logits :, : graph.n_features]
    node = 0
    layer, position, latent = graph.features[node].tolist()
    activation_value = graph.activations[node].item()
    everything = range(model.cfg.n_layers)
    exact = next(model.parameters()).dtype == torch.float64
    atol = 1e-6 if exact else 1e-3  # float32: rounding of the logits
    edits = [
        (zero(layer, position, latent), -1.0),
        (FeatureEdit(layer, position, latent, scale=3.0), 2.0),
        (FeatureEdit(layer, position, latent, value=0.5 * activation_value), -0.5),
    ]
    for edit, factor in edits:
        result = intervene(model, transcoders, tokens, [edit], freeze_attention=True, constrained_layers=everything)
        change = demeaned(model, result.new_logits) - demeaned(model, result.original_logits)
        expected = factor * logit_rows[:, node].to(change.dtype)
        tolerance = atol * expected.abs().max().item()
        assert torch.allclose(change[graph.logit_tokens], expected, rtol=1e-4, atol=tolerance)


def by_hand(x, W_enc, b_enc, threshold, activation, k):
    """Dense latents of one encoder, written out."""
    pre = x @ W_enc.T + b_enc
    if activation == "topk":
        values, indices = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())
    if activation == "relu":
        return pre.relu()
    return pre * (pre > threshold)


def replaced_layers(modules) -> dict:
    """For each replaced layer: its sites, an encoder of its features, the decoders of
    those features by target layer, and the bias and skip term of its reconstruction."""
    layers = {}
    for t in modules:
        c = t.cfg
        threshold = getattr(t, "threshold", None)
        if hasattr(c, "layer"):
            layers[c.layer] = dict(
                sites=(c.input_site, c.output_site),
                encode=lambda x, t=t, c=c, th=threshold: by_hand(x, t.W_enc, t.b_enc, th, c.activation, c.k),
                decoders={c.layer: t.W_dec},
                b_dec=t.b_dec,
                W_skip=t.W_skip if c.skip else None,
            )
            continue
        for i, layer in enumerate(c.layers):
            layers[layer] = dict(
                sites=(c.input_site(layer), c.output_site(layer)),
                encode=lambda x, t=t, c=c, i=i, th=threshold: by_hand(
                    x, t.W_enc[i], t.b_enc[i], None if th is None else th[i], c.activation, c.k
                ),
                decoders={layer + j: t.W_dec[i][:, j] for j in range(t.W_dec[i].shape[1])},
                b_dec=t.b_dec[i],
                W_skip=t.W_skip[i] if c.skip else None,
            )
    return layers


def hand_written_run(model, modules, tokens, layer, position, latent, value) -> torch.Tensor:
    """Logits with every transcoder spliced by hand (encoder, activation and decoders
    written out), its clean error added back and one latent set to `value`."""
    layers = replaced_layers(modules)
    clean: dict[str, torch.Tensor] = {}

    def keep(site):
        def hook(act):
            clean[site] = act.detach().clone()

        return hook

    sites = [site for spec in layers.values() for site in spec["sites"]]
    with torch.no_grad(), attach(model, [(s, keep(s)) for s in sites]):
        model(tokens[None])

    def reconstruction(target, inputs, latents):
        spec = layers[target]
        out = spec["b_dec"] + sum(
            latents[s] @ layers[s]["decoders"][target] for s in latents if target in layers[s]["decoders"]
        )
        return out if spec["W_skip"] is None else out + inputs[target] @ spec["W_skip"].T

    clean_inputs = {l: clean[spec["sites"][0]] for l, spec in layers.items()}
    clean_latents = {l: spec["encode"](clean_inputs[l]) for l, spec in layers.items()}
    errors = {l: clean[spec["sites"][1]] - reconstruction(l, clean_inputs, clean_latents) for l, spec in layers.items()}
    inputs: dict[int, torch.Tensor] = {}
    latents: dict[int, torch.Tensor] = {}

    def read(l):
        def hook(act):
            inputs[l] = act
            latents[l] = layers[l]["encode"](act)
            if l == layer:
                latents[l][:, position, latent] = value

        return hook

    def write(l):
        return lambda act: reconstruction(l, inputs, latents) + errors[l]

    hooks = []
    for l, spec in sorted(layers.items()):
        hooks += [(spec["sites"][0], read(l)), (spec["sites"][1], write(l))]
    with torch.no_grad(), attach(model, hooks):
        return model(tokens[None])[0]


FREE_CASES = [("per_layer", *case) for case in CASES[: len(CASES) // 2 + 1]]
FREE_CASES += [("cross_layer", *case) for case in CLT_CASES[len(CLT_CASES) // 2 :]]


@pytest.mark.parametrize("kind, name, activation, skip", FREE_CASES)
def test_free_edit_matches_a_hand_written_run(kind, name, activation, skip):
    model = build_model(name)
    transcoders = modules_for(model, kind, activation, skip)
    tokens = prompt(model)
    graph = attribute(model, transcoders, tokens, max_feature_nodes=1)
    layer, position, latent = graph.features[0].tolist()
    result = intervene(model, transcoders, tokens, [zero(layer, position, latent)], freeze_attention=False)
    expected = hand_written_run(model, transcoders, tokens, layer, position, latent, 0.0)
    assert torch.allclose(result.new_logits, expected, atol=1e-4)
    assert torch.allclose(result.original_logits, model(tokens[None])[0], atol=1e-5)
    change = result.change[-1]
    assert torch.equal(result.top_changes, change[result.top_tokens])
    nth_largest = change.abs().sort(descending=True).values[len(result.top_tokens) - 1]
    assert result.top_changes.abs().min() >= nth_largest


def test_bad_edits_are_refused_with_a_clear_error():
    model = build_model(MODEL_PARAMS[0])
    transcoders = transcoders_for(model, "topk", True)
    tokens = prompt(model)
    with pytest.raises(ValueError, match="no transcoder replaces layer 1"):
        intervene(model, transcoders, tokens, [zero(1, 2, 3)])
    with pytest.raises(ValueError, match="position 99 is out of range"):
        intervene(model, transcoders, tokens, [zero(0, 99, 3)])
    with pytest.raises(ValueError, match="latent 999 is out of range"):
        intervene(model, transcoders, tokens, [zero(0, 1, 999)])
    graph = attribute(model, transcoders, tokens)
    active = {tuple(f) for f in graph.features.tolist()}
    inactive = next(l for l in range(48) if (0, 1, l) not in active)
    with pytest.raises(ValueError, match="not active"):
        intervene(model, transcoders, tokens, [zero(0, 1, inactive)])
    intervene(model, transcoders, tokens, [FeatureEdit(0, 1, inactive, value=1.0)])  # switching one on is fine
    with pytest.raises(ValueError, match="exactly one"):
        FeatureEdit(0, 1, 2, value=1.0, scale=2.0)
    with pytest.raises(ValueError, match="context"):
        intervene(model, transcoders, torch.zeros(model.cfg.n_ctx + 1, dtype=torch.long), [])
    with pytest.raises(ValueError, match="constrained_layers"):
        intervene(model, transcoders, tokens, [], constrained_layers=[7])
