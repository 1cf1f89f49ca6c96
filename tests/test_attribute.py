"""attribute(): every edge against an independent computation in the frozen model.

The reference freezes the model by replacing queries, keys and norm scales with their
values recorded on a clean pass, holds every MLP output at its clean value except for
the skip term, and removes one source node per batch row: since that model is affine in
the node values, a target's drop when a source is removed is exactly the edge."""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
from conftest import MODEL_PARAMS, build_model, make_transcoder

from tl_transcoders import Transcoder, TranscoderConfig
from tl_transcoders.attribution.attribute import attribute
from tl_transcoders.attribution.replacement import ReplacementError
from tl_transcoders.hooks.sites import attach

# The reference runs also edit norm scales, which the Bridge reports on every pass.
pytestmark = pytest.mark.filterwarnings("ignore:A forward hook edited hook_scale")

FROZEN = re.compile(r"(ln\w*\.hook_scale|attn\.hook_[qk])$")
LAYERS = (0, 2)  # layer 1 keeps its MLP: its output is an error node only


@functools.cache
def float64_model(name: str) -> torch.nn.Module:
    """A float64 copy of the test model (float32 where a class cannot be converted)."""
    model = build_model(name)
    try:
        converted = copy.deepcopy(model).to(torch.float64)
        with torch.no_grad():
            converted(torch.zeros(1, 2, dtype=torch.long))
        return converted
    except RuntimeError:
        return model


def transcoders_for(model, activation: str, skip: bool) -> list:
    dtype = next(model.parameters()).dtype
    transcoders = []
    for layer in LAYERS:
        transcoder = make_transcoder(model, layer, activation=activation, skip=skip, seed=layer).to(dtype)
        transcoder.cfg.dtype = str(dtype).removeprefix("torch.")
        transcoders.append(transcoder)
    return transcoders


def prompt(model) -> torch.Tensor:
    """Random tokens; starting with BOS where the model has a tokenizer."""
    tokens = torch.randint(3, model.cfg.d_vocab, (7,), generator=torch.Generator().manual_seed(0))
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokens[0] = tokenizer.bos_token_id
    return tokens


def out_site(layer: int, by_layer: dict) -> str:
    return by_layer[layer].cfg.output_site if layer in by_layer else f"blocks.{layer}.hook_mlp_out"


def skip_of(transcoder, x: torch.Tensor) -> torch.Tensor:
    return x @ transcoder.W_skip.T if transcoder.cfg.skip else torch.zeros_like(x)


def record_clean(model, by_layer: dict, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Frozen-site values, embeddings, transcoder inputs and MLP outputs of a clean pass."""
    record: dict[str, torch.Tensor] = {}
    sites = [s for s in model.hook_dict if FROZEN.search(s)] + ["hook_embed"]
    sites += [t.cfg.input_site for t in by_layer.values()]
    sites += [out_site(layer, by_layer) for layer in range(model.cfg.n_layers)]

    def keep(site):
        def hook(act):
            record.setdefault(site, act.detach().clone())

        return hook

    with torch.no_grad(), attach(model, [(s, keep(s)) for s in dict.fromkeys(sites)]):
        model(tokens[None])
    return record


def frozen_values(
    model, by_layer: dict, tokens, record: dict, removals: dict[str, torch.Tensor], graph
) -> torch.Tensor:
    """The graph's target values `[batch, n_targets]` in the frozen model, with
    `removals[site]` (`[batch, n_pos, d]`) subtracted at the embedding and MLP outputs."""
    batch = next(iter(removals.values())).shape[0]
    current: dict[int, torch.Tensor] = {}
    frozen = [s for s in model.hook_dict if FROZEN.search(s)]
    hooks = [(s, (lambda s: lambda act: record[s].expand_as(act).clone())(s)) for s in frozen]
    hooks.append(("hook_embed", lambda act: record["hook_embed"] - removals["hook_embed"]))
    for layer in range(model.cfg.n_layers):
        site, t = out_site(layer, by_layer), by_layer.get(layer)
        if t is not None:
            keep = (lambda layer: lambda act: current.__setitem__(layer, act))(layer)
            hooks.append((t.cfg.input_site, keep))

        def output(act, site=site, t=t, layer=layer):
            value = record[site].expand_as(act).clone()
            if t is not None:
                value = value - skip_of(t, record[t.cfg.input_site]) + skip_of(t, current[layer])
            return value - removals.get(site, 0)

        hooks.append((site, output))
    unembed: dict[str, torch.Tensor] = {}
    hooks.append(("unembed.hook_out", lambda act: unembed.__setitem__("out", act)))
    with torch.no_grad(), attach(model, hooks):
        model(tokens[None].expand(batch, -1))
    values = []
    for layer, position, latent in graph.features.tolist():
        values.append(current[layer][:, position] @ by_layer[layer].W_enc[latent])
    logits = unembed["out"][:, -1]
    demeaned = logits - logits.mean(-1, keepdim=True)
    values += [demeaned[:, v] for v in graph.logit_tokens.tolist()]
    return torch.stack(values, dim=1)


def reference(
    model, by_layer: dict, tokens, graph, n_checked: int = 40
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Edges `[n_targets, n_checked_sources]` by removing each of a sample of sources
    (every error and token node and `n_checked` features), each target's clean value
    minus its value with every source removed, and the sampled source nodes."""
    record = record_clean(model, by_layer, tokens)
    n_pos, n_layers = graph.n_pos, graph.n_layers
    sources: list[tuple[str, int, torch.Tensor]] = []
    errors = {}
    for layer in range(n_layers):
        site, t = out_site(layer, by_layer), by_layer.get(layer)
        errors[layer] = record[site][0].clone()
        if t is not None:
            errors[layer] -= skip_of(t, record[t.cfg.input_site][0]) + t.b_dec
    for (layer, position, latent), activation in zip(graph.features.tolist(), graph.activations.tolist()):
        vector = activation * by_layer[layer].W_dec[latent].detach()
        sources.append((out_site(layer, by_layer), position, vector))
        errors[layer][position] -= vector
    for layer in range(n_layers):
        sources += [(out_site(layer, by_layer), p, errors[layer][p]) for p in range(n_pos)]
    sources += [("hook_embed", p, record["hook_embed"][0, p]) for p in range(n_pos)]
    generator = torch.Generator().manual_seed(0)
    sample = torch.randperm(graph.n_features, generator=generator)[:n_checked].tolist()
    checked = sorted(sample) + list(range(graph.n_features, len(sources)))
    sites = {site for site, _, _ in sources}
    embed = record["hook_embed"]
    removals = {site: embed.new_zeros(2 + len(checked), n_pos, embed.shape[-1]) for site in sites}
    for site, position, vector in sources:
        removals[site][1, position] += vector.to(embed.dtype)
    for row, node in enumerate(checked, start=2):
        site, position, vector = sources[node]
        removals[site][row, position] = vector.to(embed.dtype)
    with torch.no_grad():
        values = frozen_values(model, by_layer, tokens, record, removals, graph)
    return (values[0] - values[2:]).T, values[0] - values[1], checked


def clean_activations(by_layer: dict, record: dict, graph) -> torch.Tensor:
    acts = []
    for layer, position, latent in graph.features.tolist():
        t = by_layer[layer]
        acts.append(t.encode(record[t.cfg.input_site][0, position])[latent])
    return torch.stack(acts)


COMBOS = [("topk", True), ("relu", False), ("jumprelu", True), ("topk", False)]
CASES = [(name, *COMBOS[i % len(COMBOS)]) for i, name in enumerate(MODEL_PARAMS)]


@pytest.mark.parametrize("name, activation, skip", CASES)
def test_every_edge_is_the_exact_effect_of_its_source(name, activation, skip):
    model = float64_model(name)
    transcoders = transcoders_for(model, activation, skip)
    by_layer = {t.cfg.layer: t for t in transcoders}
    tokens = prompt(model)
    graph = attribute(model, transcoders, tokens, batch_size=128)
    graph.validate()
    n_sources = graph.n_nodes - graph.n_logits
    targets = list(range(graph.n_features)) + [graph.logit_node(i) for i in range(graph.n_logits)]
    edges, totals, checked = reference(model, by_layer, tokens, graph)
    adjacency = graph.adjacency[targets][:, :n_sources].to(edges.dtype)
    exact = next(model.parameters()).dtype == torch.float64
    scale = edges.abs().max().item()
    atol = (1e-6 if exact else 1e-5) * scale  # some parts (rotary tables) stay float32
    assert ((adjacency[:, checked] - edges).abs() <= 1e-4 * edges.abs() + atol).all()
    assert torch.allclose(adjacency.sum(dim=1), totals, rtol=1e-4, atol=atol)
    # Error and token nodes are sources only; nothing points into a logit.
    assert not graph.adjacency[graph.n_features : n_sources].any()
    assert not graph.adjacency[:, n_sources:].any()
    record = record_clean(model, by_layer, tokens)
    activations = clean_activations(by_layer, record, graph)
    assert torch.allclose(graph.activations.to(edges.dtype), activations, rtol=1e-6, atol=1e-6)
    if getattr(model, "tokenizer", None) is not None:
        assert graph.features[:, 1].min() >= 1  # no feature nodes at the BOS position


@pytest.mark.parametrize("name", [MODEL_PARAMS[0], "bridge-llama"])
def test_without_transcoders_every_mlp_is_an_error_node(name):
    model = float64_model(name)
    tokens = prompt(model)
    graph = attribute(model, [], tokens)
    assert graph.n_features == 0
    edges, totals, checked = reference(model, {}, tokens, graph)
    logit_rows = graph.adjacency[-graph.n_logits :, : -graph.n_logits].to(edges.dtype)
    assert torch.allclose(logit_rows[:, checked], edges, rtol=1e-4, atol=1e-6 * edges.abs().max().item())
    assert torch.allclose(logit_rows.sum(dim=1), totals, rtol=1e-4, atol=1e-6 * edges.abs().max().item())


@pytest.mark.parametrize("name", [MODEL_PARAMS[0], "bridge-llama"])
def test_logit_nodes_cover_the_desired_probability(name):
    model = build_model(name)
    tokens = prompt(model)
    transcoders = transcoders_for(model, "topk", True)
    graph = attribute(model, transcoders, tokens, max_n_logits=5, desired_logit_prob=0.3)
    probabilities = torch.softmax(model(tokens[None])[0, -1], -1)
    top = probabilities.sort(descending=True)
    n = min(5, int((top.values.cumsum(0) < 0.3).sum()) + 1)
    assert graph.logit_tokens.tolist() == top.indices[:n].tolist()
    assert torch.allclose(graph.logit_probabilities, top.values[:n])


@pytest.mark.parametrize("name", [MODEL_PARAMS[0], "bridge-llama"])
def test_max_feature_nodes_keeps_the_most_logit_influential_features(name):
    model = build_model(name)
    transcoders = transcoders_for(model, "relu", True)
    tokens = prompt(model)
    full = attribute(model, transcoders, tokens)
    n = 12
    part = attribute(model, transcoders, tokens, max_feature_nodes=n, batch_size=4, update_interval=3)
    logit_rows = full.adjacency[-full.n_logits :].abs()
    direct = full.logit_probabilities @ (logit_rows / logit_rows.sum(dim=1, keepdim=True))
    expected = full.features[direct[: full.n_features].topk(n).indices]
    assert sorted(map(tuple, part.features.tolist())) == sorted(map(tuple, expected.tolist()))
    # Its rows are the full graph's rows, restricted to the kept features.
    nodes = [full.feature_node(*f) for f in part.features.tolist()]
    nodes += range(full.n_features, full.n_nodes)
    assert torch.allclose(part.adjacency, full.adjacency[nodes][:, nodes], atol=1e-6)


def test_later_rounds_follow_indirect_influence():
    model = build_model(MODEL_PARAMS[0])
    transcoders = transcoders_for(model, "relu", True)
    tokens = prompt(model)
    full = attribute(model, transcoders, tokens)
    part = attribute(model, transcoders, tokens, max_feature_nodes=30, batch_size=5, update_interval=1)
    assert part.n_features == 30
    kept = {tuple(f) for f in part.features.tolist()}
    # The first round is the top of the direct influence on the logits.
    logit_rows = full.adjacency[-full.n_logits :].abs()
    direct = full.logit_probabilities @ (logit_rows / logit_rows.sum(dim=1, keepdim=True))
    first = full.features[direct[: full.n_features].topk(5).indices]
    assert {tuple(f) for f in first.tolist()} <= kept


def test_string_prompt_and_bos():
    model = build_model("bridge-sandwich")
    graph = attribute(model, transcoders_for(model, "topk", True), "w1 w2 w3 w4")
    assert graph.tokens[0].item() == model.tokenizer.bos_token_id
    assert graph.prompt == "w1 w2 w3 w4"
    assert graph.features[:, 1].min() >= 1
    assert graph.metadata["bos_without_features"] is True


def test_bad_input_is_refused_with_a_clear_error():
    model = build_model(MODEL_PARAMS[0])
    transcoders = transcoders_for(model, "topk", True)
    with pytest.raises(ValueError, match="context"):
        attribute(model, transcoders, torch.zeros(model.cfg.n_ctx + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids must lie"):
        attribute(model, transcoders, torch.tensor([1, model.cfg.d_vocab]))
    with pytest.raises(ValueError, match="no tokenizer"):
        attribute(model, transcoders, "some text")
    with pytest.raises(ValueError, match="max_n_logits"):
        attribute(model, transcoders, torch.tensor([1, 2]), max_n_logits=0)
    foreign = Transcoder(TranscoderConfig(d_in=8, d_out=8, d_latent=32, layer=0, input_space="any"))
    with pytest.raises(ReplacementError, match="another model"):
        attribute(model, [foreign], torch.tensor([1, 2]))
    sae = Transcoder(
        TranscoderConfig(d_in=16, d_out=16, d_latent=32, layer=1, input_site="blocks.1.hook_mlp_out", input_space="any")
    )
    with pytest.raises(ReplacementError, match="SAE"):
        attribute(model, [sae], torch.tensor([1, 2]))
    with pytest.raises(ReplacementError, match="same layer"):
        second = make_transcoder(model, 0, output_site="blocks.0.mlp.hook_out")
        attribute(model, [transcoders[0], second], torch.tensor([1, 2]))


def test_graph_tensors_carry_no_autograd_history():
    model = build_model(MODEL_PARAMS[0])
    graph = attribute(model, [make_transcoder(model, 1)], torch.tensor([1, 2, 3, 4]))
    tensors = [
        graph.tokens,
        graph.features,
        graph.activations,
        graph.logit_tokens,
        graph.logit_probabilities,
        graph.adjacency,
    ]
    assert not any(t.requires_grad for t in tensors)
