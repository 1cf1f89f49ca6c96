"""Input-invariant attribution, checked against autograd in the frozen model.

The reference (`frozen_derivative`) runs the real model with every norm scale and
attention pattern detached (patterns kept only where a test opens a head), every MLP
output detached except chosen transcoders' skip terms, and a scalar `eps` adding a
vector at one site and position. The derivative of a target (a transcoder feature's
pre-activation or a logit) with respect to `eps`, divided by the frozen scales and
pattern on the path, must equal the invariant weight.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import build_model, make_transcoder

from tl_transcoders.attribution.virtual_weights import (
    AttributionError,
    Head,
    blockwise_topk,
    embedding_weights,
    feature_weights,
    logit_weights,
    top_connections,
    top_downstream,
    top_logits,
    top_tokens,
    top_upstream,
)
from tl_transcoders.hooks.sites import attach

NORMS = ("ln1", "ln2", "ln1_post", "ln2_post")


def frozen_derivative(model, transcoders, tokens, inject, target, skip_layers=(), attention=(), head=None):
    """d(target) / d(eps) in the frozen model, and the frozen norm scales and attention
    patterns by hook name.

    inject: (site, position, vectors [n, d]) adds `eps @ vectors` there (eps [n]), so
    the derivative is one number per vector. target: ("feature",
    transcoder, position, latent) for a pre-activation less its bias, or ("logit",
    position, token) for the unembedding output. Patterns are frozen by detaching
    queries and keys; the attention output of layers not in `attention` is detached.
    head: (layer, head, destination) keeps only what flows through that head's output
    at that position (the chain rule through its `hook_z`)."""
    n_layers = model.cfg.n_layers
    site, position, vectors = inject
    eps = torch.zeros(vectors.shape[0], requires_grad=True)
    frozen, live = {}, {}
    by_layer = {t.cfg.layer: t for t in transcoders}

    def freeze(name):
        def hook(value):
            frozen[name] = value.detach()
            return value.detach()

        return hook

    def keep(name):
        def hook(value):
            live[name] = value.clone()  # returned, so certainly part of the graph
            return live[name]

        return hook

    def replace_output(layer):
        def hook(activation):
            out = activation.detach()
            if layer in skip_layers:
                skip = live[f"input{layer}"] @ by_layer[layer].W_skip.T
                out = out + (skip - skip.detach())
            return out

        return hook

    def add(position, vectors):
        def hook(activation):
            delta = torch.zeros(activation.shape[-2:], dtype=activation.dtype)
            delta[position] = 1.0
            return activation + delta * (eps.to(activation.dtype) @ vectors.to(activation.dtype))

        return hook

    hooks = [(name, freeze(name)) for name in model.hook_dict if name.endswith("hook_scale")]
    for layer in range(n_layers):
        hooks += [(f"blocks.{layer}.attn.{h}", freeze(h)) for h in ("hook_q", "hook_k")]
        hooks.append((f"blocks.{layer}.attn.hook_pattern", freeze(f"pattern{layer}")))
        hooks.append((f"blocks.{layer}.attn.hook_z", keep(f"z{layer}")))
        if layer not in attention:
            hooks.append((f"blocks.{layer}.hook_attn_out", lambda value: value.detach()))
        if layer in by_layer:
            hooks.append((by_layer[layer].cfg.input_site, keep(f"input{layer}")))
            hooks.append((by_layer[layer].cfg.output_site, replace_output(layer)))
        else:
            hooks.append((f"blocks.{layer}.hook_mlp_out", replace_output(layer)))
    hooks.append((site, add(position, vectors)))
    hooks.append(("unembed.hook_out", keep("logits")))
    with warnings.catch_warnings(), attach(model, hooks):
        warnings.simplefilter("ignore")
        model(tokens[None])
    if target[0] == "feature":
        _, transcoder, position, latent = target
        value = live[f"input{transcoder.cfg.layer}"][0, position] @ transcoder.W_enc[latent]
    else:
        _, position, token = target
        value = live["logits"][0, position, token]
    if head is not None:
        layer, index, destination = head
        z = live[f"z{layer}"]
        (grad_z,) = torch.autograd.grad(value, z, retain_graph=True)
        mask = torch.zeros(z.shape[0], z.shape[1], model.cfg.n_heads, model.cfg.d_head, dtype=z.dtype)
        mask[:, destination, index] = 1.0
        value = (z * grad_z * mask.reshape(z.shape)).sum()
    (grad,) = torch.autograd.grad(value, eps, allow_unused=True)
    scales = {name.removesuffix(".hook_scale"): v.reshape(-1) for name, v in frozen.items() if "hook_scale" in name}
    scales.update({name: v[0] for name, v in frozen.items() if name.startswith("pattern")})
    return (torch.zeros_like(eps) if grad is None else grad), scales


def assert_close(actual, expected, rel=1e-4):
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    assert (actual - expected).abs().max() <= rel * expected.abs().max() + 1e-7, (actual, expected)


TOKENS = torch.tensor([2, 7, 13, 21, 34, 5])


def transcoders_for(model, skip=True, activation="topk"):
    return [make_transcoder(model, layer, activation=activation, skip=skip, seed=layer) for layer in range(3)]


def ln2_scale(scales, layer, position):
    return scales.get(f"blocks.{layer}.ln2", torch.ones(99))[position]


def test_feature_weights_direct_and_through_skip(model):
    t0, t1, t2 = transcoders_for(model)
    position, sources, targets = 3, [0, 5, 11], [1, 4]
    weights = feature_weights(model, t0, t2, sources, targets)
    through_skip = feature_weights(model, t0, t2, sources, targets, via=[t1])
    inject = (t0.cfg.output_site, position, t0.W_dec[sources].detach())
    for b, j in enumerate(targets):
        target = ("feature", t2, position, j)
        direct, scales = frozen_derivative(model, [t0, t1, t2], TOKENS, inject, target)
        total, _ = frozen_derivative(model, [t0, t1, t2], TOKENS, inject, target, skip_layers=(1,))
        s1, s2 = ln2_scale(scales, 1, position), ln2_scale(scales, 2, position)
        assert_close(weights[:, b], direct * s2)
        assert_close(through_skip[:, b], (total - direct) * s1 * s2)


@pytest.mark.parametrize("head", [0, 3])
def test_feature_weights_through_head(model, head):
    t0, t2 = make_transcoder(model, 0), make_transcoder(model, 2, seed=2)
    dest, src, sources, targets = 4, 1, [0, 7], [3, 9]
    weights = feature_weights(model, t0, t2, sources, targets, via=[Head(1, head)])
    for b, j in enumerate(targets):
        derivative, scales = frozen_derivative(
            model,
            [t0, t2],
            TOKENS,
            (t0.cfg.output_site, src, t0.W_dec[sources].detach()),
            ("feature", t2, dest, j),
            attention=(1,),
            head=(1, head, dest),
        )
        pattern = scales["pattern1"][head, dest, src]
        post = scales.get("blocks.1.ln1_post", torch.ones(99))[dest]
        factor = scales["blocks.1.ln1"][src] * post * ln2_scale(scales, 2, dest) / pattern
        assert_close(weights[:, b], derivative * factor)


def embedding_at(model, position):
    """The activation of `hook_embed` at `position` (the scaled token embedding)."""
    _, cache = model.run_with_cache(TOKENS[None], names_filter="hook_embed")
    return cache["hook_embed"][0, position][None]


def test_embedding_weights_direct_and_through_head(model):
    t1 = make_transcoder(model, 1)
    dest, src, head, latent = 4, 2, 1, 5
    direct = embedding_weights(model, t1, [latent])[TOKENS[dest], 0]
    via_head = embedding_weights(model, t1, [latent], via=[Head(0, head)])[TOKENS[src], 0]
    ref, scales = frozen_derivative(
        model, [t1], TOKENS, ("hook_embed", dest, embedding_at(model, dest)), ("feature", t1, dest, latent)
    )
    assert_close(direct, ref * ln2_scale(scales, 1, dest))
    ref, scales = frozen_derivative(
        model,
        [t1],
        TOKENS,
        ("hook_embed", src, embedding_at(model, src)),
        ("feature", t1, dest, latent),
        attention=(0,),
        head=(0, head, dest),
    )
    pattern = scales["pattern0"][head, dest, src]
    post = scales.get("blocks.0.ln1_post", torch.ones(99))[dest]
    assert_close(via_head, ref * scales["blocks.0.ln1"][src] * post * ln2_scale(scales, 1, dest) / pattern)


def test_logit_weights(model):
    t1 = make_transcoder(model, 1)
    position, latents, tokens = 2, [0, 8], [3, 17, 40]
    weights = logit_weights(model, t1, latents, tokens)
    for b, token in enumerate(tokens):
        ref, scales = frozen_derivative(
            model, [t1], TOKENS, (t1.cfg.output_site, position, t1.W_dec[latents].detach()), ("logit", position, token)
        )
        assert_close(weights[:, b], ref * scales.get("ln_final", torch.ones(99))[position])


def assert_same_top(chosen: torch.Tensor, scores: torch.Tensor, k: int) -> None:
    """`chosen` (the scores of the entries a blockwise query picked) are the `k` largest
    of `scores`, up to float32 rounding: blocks are multiplied in other shapes than the
    dense matrix, so near-equal entries may trade places."""
    assert chosen.numel() == k
    torch.testing.assert_close(chosen.sort(descending=True).values, scores.flatten().topk(k).values)


@pytest.mark.parametrize("mode", ["absolute", "positive", "negative"])
def test_blockwise_topk_equals_dense(mode):
    model = build_model("bridge-llama")
    t0, t1, t2 = transcoders_for(model)
    dense = feature_weights(model, t0, t2, via=[t1])
    score = {"absolute": dense.abs(), "positive": dense, "negative": -dense}[mode]
    pairs = top_connections(model, t0, t2, k=7, via=[t1], mode=mode, block_size=5)
    assert_same_top(score[pairs.sources, pairs.targets], score, 7)
    torch.testing.assert_close(pairs.values, dense[pairs.sources, pairs.targets])

    up = top_upstream(model, t2, 3, t0, k=5, via=[t1], mode=mode, block_size=7)
    assert_same_top(score[up.indices, 3], score[:, 3], 5)
    down = top_downstream(model, t0, 4, t2, k=5, via=[t1], mode=mode, block_size=7)
    assert_same_top(score[4, down.indices], score[4], 5)
    torch.testing.assert_close(down.values, dense[4, down.indices])

    tokens = embedding_weights(model, t2, [6])[:, 0]
    tok_score = {"absolute": tokens.abs(), "positive": tokens, "negative": -tokens}[mode]
    assert_same_top(tok_score[top_tokens(model, t2, 6, k=4, mode=mode, block_size=9).indices], tok_score, 4)
    logits = logit_weights(model, t1, [2])[0]
    log_score = {"absolute": logits.abs(), "positive": logits, "negative": -logits}[mode]
    assert_same_top(log_score[top_logits(model, t1, 2, k=4, mode=mode, block_size=9).indices], log_score, 4)


def test_blockwise_topk_small_blocks_match_one_block():
    generator = torch.Generator().manual_seed(0)
    rows, cols = torch.randn(37, 8, generator=generator), torch.randn(23, 8, generator=generator)
    one = blockwise_topk(rows, cols, 11, block_size=1000)
    many = blockwise_topk(rows, cols, 11, block_size=4)
    scores = (rows @ cols.T).abs()
    assert_same_top(scores[many.sources, many.targets], scores, 11)
    torch.testing.assert_close(
        scores[one.sources, one.targets].sort().values, scores[many.sources, many.targets].sort().values
    )


def test_clear_errors():
    model = build_model("bridge-gpt2")
    t0, t1, t2 = transcoders_for(model)
    with pytest.raises(AttributionError, match="order"):
        feature_weights(model, t2, t0)
    with pytest.raises(AttributionError, match="order"):
        feature_weights(model, t1, t2, via=[Head(1, 0)])
    with pytest.raises(AttributionError, match="order"):
        feature_weights(model, t0, t1, via=[t1])
    with pytest.raises(AttributionError, match="latent index 48"):
        feature_weights(model, t0, t2, [48])
    with pytest.raises(AttributionError, match="head 4"):
        feature_weights(model, t0, t2, via=[Head(1, 4)])
    no_skip = make_transcoder(model, 1, skip=False)
    with pytest.raises(AttributionError, match="no skip"):
        feature_weights(model, t0, t2, via=[no_skip])
    t0.cfg.model_name = "another-model"
    with pytest.raises(AttributionError, match="another-model"):
        top_downstream(model, t0, 1, t2)
