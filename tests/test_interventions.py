"""intervene(): feature edits against the attribution graph and a hand-written run."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_PARAMS, build_model
from test_attribute import CASES, float64_model, prompt, transcoders_for

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


@pytest.mark.parametrize("name, activation, skip", CASES)
def test_frozen_linear_edit_changes_logits_by_the_graph_edge(name, activation, skip):
    model = float64_model(name)
    transcoders = transcoders_for(model, activation, skip)
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


def skip_term(transcoder, x: torch.Tensor) -> torch.Tensor:
    return x @ transcoder.W_skip.T if transcoder.cfg.skip else torch.zeros_like(x)


def hand_written_run(model, transcoders, tokens, layer, position, latent, value) -> torch.Tensor:
    """Logits with every transcoder spliced by hand (encoder, activation and decoder
    written out), its clean error added back and one latent set to `value`."""
    clean: dict[str, torch.Tensor] = {}

    def keep(site):
        def hook(act):
            clean[site] = act.detach().clone()

        return hook

    sites = [t.cfg.input_site for t in transcoders] + [t.cfg.output_site for t in transcoders]
    with torch.no_grad(), attach(model, [(s, keep(s)) for s in sites]):
        model(tokens[None])

    def by_hand(t, x):
        pre = x @ t.W_enc.T + t.b_enc
        if t.cfg.activation == "topk":
            values, indices = pre.topk(t.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, indices, values.relu())
        if t.cfg.activation == "relu":
            return pre.relu()
        return pre * (pre > t.threshold)

    current: dict[int, torch.Tensor] = {}
    hooks = []
    for t in transcoders:
        l = t.cfg.layer
        x_clean = clean[t.cfg.input_site]
        error = clean[t.cfg.output_site] - (by_hand(t, x_clean) @ t.W_dec + t.b_dec + skip_term(t, x_clean))

        def write(act, t=t, l=l, error=error):
            x = current[l]
            latents = by_hand(t, x)
            if l == layer:
                latents[:, position, latent] = value
            return latents @ t.W_dec + t.b_dec + skip_term(t, x) + error

        hooks.append((t.cfg.input_site, (lambda l: lambda act: current.__setitem__(l, act))(l)))
        hooks.append((t.cfg.output_site, write))
    with torch.no_grad(), attach(model, hooks):
        return model(tokens[None])[0]


@pytest.mark.parametrize("name, activation, skip", CASES[: len(CASES) // 2 + 1])
def test_free_edit_matches_a_hand_written_run(name, activation, skip):
    model = build_model(name)
    transcoders = transcoders_for(model, activation, skip)
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
