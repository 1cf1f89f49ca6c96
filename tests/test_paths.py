"""Input-dependent attribution on a prompt: path contributions against autograd in the
frozen model (`frozen_derivative`), and the beam search finding a planted path."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_PARAMS, build_model, make_transcoder
from test_virtual_weights import TOKENS, frozen_derivative

from tl_transcoders.attribution.paths import Node, find_paths, path_contribution, run_prompt
from tl_transcoders.attribution.virtual_weights import (
    AttributionError,
    Head,
    input_norm,
    pull_back_head,
    write_directions,
)
from tl_transcoders.hooks.sites import capture

ACTIVATIONS = ("topk", "relu", "jumprelu")


def strongest_latent(run, layer, position):
    return int(run.activations[layer][position].abs().argmax())


def clean_cache(model, names):
    _, cache = model.run_with_cache(TOKENS[None], names_filter=lambda name: name in names)
    return {name: value[0].detach() for name, value in cache.items()}


def test_path_contributions_equal_autograd(model, request):
    # one activation per model, each activation on several backends and architectures
    activation = ACTIVATIONS[MODEL_PARAMS.index(request.node.callspec.params["model"]) % len(ACTIVATIONS)]
    transcoders = [make_transcoder(model, layer, activation=activation, seed=layer) for layer in range(3)]
    t0, t1, t2 = transcoders
    run = run_prompt(model, transcoders, TOKENS)
    src, dest, head, j = 2, 4, 1, 7
    i = strongest_latent(run, 0, dest)
    i_src = strongest_latent(run, 0, src)
    a, a_src = run.activations[0][dest, i], run.activations[0][src, i_src]
    feature_target = ("feature", t2, dest, j)
    inject_i = (t0.cfg.output_site, dest, t0.W_dec[[i]].detach())

    direct, _ = frozen_derivative(model, transcoders, TOKENS, inject_i, feature_target)
    with_skip, _ = frozen_derivative(model, transcoders, TOKENS, inject_i, feature_target, skip_layers=(1,))
    via_head, _ = frozen_derivative(
        model,
        transcoders,
        TOKENS,
        (t0.cfg.output_site, src, t0.W_dec[[i_src]].detach()),
        feature_target,
        attention=(1,),
        head=(1, head, dest),
    )
    target = Node("feature", dest, 2, j)
    cases = [
        ([Node("feature", dest, 0, i), target], a * direct),
        ([Node("feature", dest, 0, i), Node("skip", dest, 1), target], a * (with_skip - direct)),
        ([Node("feature", src, 0, i_src), Node("head", src, 1, head), target], a_src * via_head),
    ]

    embeddings = clean_cache(model, {"blocks.0.hook_resid_pre"})["blocks.0.hook_resid_pre"]
    ref, _ = frozen_derivative(
        model,
        transcoders,
        TOKENS,
        ("blocks.0.hook_resid_pre", src, embeddings[[src]]),
        ("feature", t1, dest, 3),
        attention=(0,),
        head=(0, 2, dest),
    )
    cases.append(([Node("embedding", src), Node("head", src, 0, 2), Node("feature", dest, 1, 3)], ref))

    streams = clean_cache(model, {"blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid"})
    ref, _ = frozen_derivative(
        model,
        transcoders,
        TOKENS,
        ("blocks.1.hook_resid_pre", src, streams["blocks.1.hook_resid_pre"][[src]]),
        feature_target,
        attention=(1,),
        head=(1, head, dest),
    )
    cases.append(([Node("head", src, 1, head), target], ref))
    inject_mid = ("blocks.1.hook_resid_mid", dest, streams["blocks.1.hook_resid_mid"][[dest]])
    no_skip, _ = frozen_derivative(model, transcoders, TOKENS, inject_mid, feature_target)
    ref, _ = frozen_derivative(model, transcoders, TOKENS, inject_mid, feature_target, skip_layers=(1,))
    cases.append(([Node("skip", dest, 1), target], ref - no_skip))

    cache = capture(model, TOKENS[None], [t0.cfg.input_site, t0.cfg.output_site])
    error = cache[t0.cfg.output_site][[dest]] - t0(cache[t0.cfg.input_site][[dest]]).detach()
    ref, _ = frozen_derivative(model, transcoders, TOKENS, (t0.cfg.output_site, dest, error), feature_target)
    cases.append(([Node("error", dest, 0), target], ref))

    i1 = strongest_latent(run, 1, dest)
    ref, _ = frozen_derivative(
        model, transcoders, TOKENS, (t1.cfg.output_site, dest, t1.W_dec[[i1]].detach()), ("logit", dest, 11)
    )
    cases.append(([Node("feature", dest, 1, i1), Node("logit", dest, index=11)], run.activations[1][dest, i1] * ref))

    for nodes, expected in cases:
        expected = float(expected)
        assert path_contribution(run, nodes) == pytest.approx(expected, rel=1e-4, abs=1e-6), nodes


@pytest.mark.parametrize("skip", [False, True])
def test_planted_path_is_found_first(model, skip):
    """Latent i of layer 0 fires with activation 100 at every position (its decoder
    output cancelled by b_dec, so the model and the error terms are unchanged), and
    latent j of layer 2 reads a direction that sees latent i directly but no other
    source at its position and none of latent i's one-head routes."""
    t0 = make_transcoder(model, 0, skip=skip)
    t2 = make_transcoder(model, 2, skip=skip, seed=2)
    position, i, j = 3, 5, 9
    with torch.no_grad():
        t0.W_enc[i] = 0.0
        t0.b_enc[i] = 100.0
        t0.b_dec -= 100.0 * t0.W_dec[i]
    run = run_prompt(model, [t0, t2], TOKENS)
    planted = write_directions(model, t0, [i])[0]
    eye = torch.eye(model.cfg.d_model)
    head_routes = [
        pull_back_head(model, Head(layer, head), eye) @ planted for layer in (1, 2) for head in range(model.cfg.n_heads)
    ]
    others = [torch.ones(model.cfg.d_model), run.embeddings[position], run.errors[0, position], run.errors[1, position]]
    basis, _ = torch.linalg.qr(torch.stack(others + head_routes).T)
    direction = planted - basis @ (basis.T @ planted)
    norm = input_norm(model, t2)
    with torch.no_grad():
        t2.W_enc[j] = direction / (1 if norm is None else norm.weight)
    run = run_prompt(model, [t0, t2], TOKENS)
    target = Node("feature", position, 2, j)
    paths = find_paths(run, target, n_paths=5, beam_width=5, max_edges=1)
    assert paths[0].nodes == (Node("feature", position, 0, i), target)
    assert paths[0].contribution == pytest.approx(path_contribution(run, paths[0].nodes))
    assert abs(paths[1].contribution) < 0.5 * abs(paths[0].contribution)
    assert len({p.nodes for p in paths}) == len(paths)


def test_clear_errors():
    model = build_model("bridge-llama")
    t0, t2 = make_transcoder(model, 0), make_transcoder(model, 2)
    with pytest.raises(AttributionError, match="increasing layer order"):
        run_prompt(model, [t2, t0], TOKENS)
    run = run_prompt(model, [t0, t2], TOKENS)
    target = Node("feature", 3, 2, 1)
    with pytest.raises(AttributionError, match="latent index 48"):
        path_contribution(run, [Node("feature", 3, 0, 48), target])
    with pytest.raises(AttributionError, match="latent index 99"):
        find_paths(run, Node("feature", 3, 2, 99))
    with pytest.raises(AttributionError, match="no transcoder for layer 1"):
        path_contribution(run, [Node("feature", 3, 1, 0), target])
    with pytest.raises(AttributionError, match="order the path by layer"):
        path_contribution(run, [Node("feature", 3, 2, 0), Node("feature", 3, 0, 1)])
    with pytest.raises(AttributionError, match="position 12"):
        path_contribution(run, [Node("embedding", 12), target])
    other = make_transcoder(model, 1)
    other.cfg.model_name = "another-model"
    with pytest.raises(AttributionError, match="another-model"):
        run_prompt(model, [t0, other], TOKENS)
    folded = build_model("bridge_compat-llama")
    with pytest.raises(AttributionError, match="input space"):
        run_prompt(folded, [t0], TOKENS)
