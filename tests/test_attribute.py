"""attribute(): every edge against an independent computation in the frozen model.

The reference freezes the model by replacing queries, keys and norm scales with their
values recorded on a clean pass, holds every MLP output at its clean value except for
the skip term, and removes one source node per batch row: since that model is affine in
the node values, a target's drop when a source is removed is exactly the edge."""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass

import pytest
import torch
from conftest import MODEL_PARAMS, build_model, make_clt, make_transcoder

from tl_transcoders import CrossLayerTranscoder, Transcoder, TranscoderConfig
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


@dataclass
class LayerSpec:
    """How one layer is replaced, read from the weights by the test: the features at
    this layer (their input site, encoder and dense encoding), the layer's own output
    bias and skip term, and the features' decoders by the layer they write into."""

    input_site: str
    output_site: str
    W_enc: torch.Tensor
    b_dec: torch.Tensor
    W_skip: torch.Tensor | None
    encode: object
    decoders: dict[int, torch.Tensor]


def specs_of(transcoders: list) -> dict[int, LayerSpec]:
    specs = {}
    for t in transcoders:
        if isinstance(t, CrossLayerTranscoder):
            for i, layer in enumerate(t.cfg.layers):
                specs[layer] = LayerSpec(
                    t.cfg.input_site(layer),
                    t.cfg.output_site(layer),
                    t.W_enc[i].detach(),
                    t.b_dec[i].detach(),
                    t.W_skip[i].detach() if t.cfg.skip else None,
                    lambda x, t=t, layer=layer: t.encode(layer, x),
                    {layer + j: t.W_dec[i][:, j].detach() for j in range(t.W_dec[i].shape[1])},
                )
        else:
            c = t.cfg
            specs[c.layer] = LayerSpec(
                c.input_site,
                c.output_site,
                t.W_enc.detach(),
                t.b_dec.detach(),
                t.W_skip.detach() if c.skip else None,
                t.encode,
                {c.layer: t.W_dec.detach()},
            )
    return specs


def out_site(layer: int, specs: dict) -> str:
    return specs[layer].output_site if layer in specs else f"blocks.{layer}.hook_mlp_out"


def skip_of(spec: LayerSpec, x: torch.Tensor) -> torch.Tensor:
    return x @ spec.W_skip.T if spec.W_skip is not None else torch.zeros_like(x)


def record_clean(model, specs: dict, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Frozen-site values, embeddings, feature inputs and MLP outputs of a clean pass."""
    record: dict[str, torch.Tensor] = {}
    sites = [s for s in model.hook_dict if FROZEN.search(s)] + ["hook_embed"]
    sites += [spec.input_site for spec in specs.values()]
    sites += [out_site(layer, specs) for layer in range(model.cfg.n_layers)]

    def keep(site):
        def hook(act):
            record.setdefault(site, act.detach().clone())

        return hook

    with torch.no_grad(), attach(model, [(s, keep(s)) for s in dict.fromkeys(sites)]):
        model(tokens[None])
    return record


def frozen_values(
    model, specs: dict, tokens, record: dict, removals: dict[str, torch.Tensor], graph, captured: dict | None = None
) -> torch.Tensor:
    """The graph's target values `[batch, n_targets]` in the frozen model, with
    `removals[site]` (`[batch, n_pos, d]`) subtracted at the embedding and MLP outputs.
    Sites named in `captured` are left live (not frozen) and their values stored there."""
    batch = next(iter(removals.values())).shape[0]
    current: dict[int, torch.Tensor] = {}
    captured = {} if captured is None else captured
    frozen = [s for s in model.hook_dict if FROZEN.search(s) and s not in captured]
    hooks = [(s, (lambda s: lambda act: record[s].expand_as(act).clone())(s)) for s in frozen]
    hooks += [(s, (lambda s: lambda act: captured.__setitem__(s, act.clone()))(s)) for s in captured]
    hooks.append(("hook_embed", lambda act: record["hook_embed"] - removals["hook_embed"]))
    for layer in range(model.cfg.n_layers):
        site, spec = out_site(layer, specs), specs.get(layer)
        if spec is not None:
            keep = (lambda layer: lambda act: current.__setitem__(layer, act))(layer)
            hooks.append((spec.input_site, keep))

        def output(act, site=site, spec=spec, layer=layer):
            value = record[site].expand_as(act).clone()
            if spec is not None:
                value = value - skip_of(spec, record[spec.input_site]) + skip_of(spec, current[layer])
            return value - removals.get(site, 0)

        hooks.append((site, output))
    unembed: dict[str, torch.Tensor] = {}
    hooks.append(("unembed.hook_out", lambda act: unembed.__setitem__("out", act)))
    residual: dict[int, torch.Tensor] = {}
    for layer in range(model.cfg.n_layers):
        hooks.append((f"blocks.{layer}.hook_resid_post", (lambda l: lambda act: residual.__setitem__(l, act))(layer)))
    with torch.no_grad(), attach(model, hooks):
        model(tokens[None].expand(batch, -1))
    values = []
    for layer, position, latent in graph.features.tolist():
        values.append(current[layer][:, position] @ specs[layer].W_enc[latent])
    logits = unembed["out"][:, -1]
    demeaned = logits - logits.mean(-1, keepdim=True)
    targets = graph.metadata.get("targets") or [{"kind": "logit", "token": v} for v in graph.logit_tokens.tolist()]
    for t in targets:
        if t["kind"] == "logit":
            values.append(demeaned[:, t["token"]])
        elif t["kind"] == "logit_difference":
            values.append(logits[:, t["token"]] - logits[:, t["other"]])
        elif t["kind"] == "residual":
            direction = torch.tensor(t["direction"], dtype=logits.dtype)
            values.append(residual[t["layer"]][:, t["position"]].to(logits.dtype) @ direction)
        else:
            x = current[t["layer"]][:, t["position"]]
            values.append(x @ specs[t["layer"]].W_enc[t["latent"]].to(x.dtype))
    return torch.stack(values, dim=1)


def reference(
    model, specs: dict, tokens, graph, n_checked: int = 40, captured: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Edges `[n_targets, n_checked_sources]` by removing each of a sample of sources
    (every error and token node and `n_checked` features), each target's clean value
    minus its value with every source removed, and the sampled source nodes. A feature
    is removed at every layer its decoders write into. `captured` as for
    `frozen_values` (batch rows: clean, every source removed, then each checked one)."""
    record = record_clean(model, specs, tokens)
    n_pos, n_layers = graph.n_pos, graph.n_layers
    sources: list[list[tuple[str, int, torch.Tensor]]] = []
    errors = {}
    for layer in range(n_layers):
        site, spec = out_site(layer, specs), specs.get(layer)
        errors[layer] = record[site][0].clone()
        if spec is not None:
            errors[layer] -= skip_of(spec, record[spec.input_site][0]) + spec.b_dec
    for (layer, position, latent), activation in zip(graph.features.tolist(), graph.activations.tolist()):
        writes = []
        for target, W in specs[layer].decoders.items():
            vector = activation * W[latent]
            writes.append((out_site(target, specs), position, vector))
            errors[target][position] -= vector
        sources.append(writes)
    for layer in range(n_layers):
        sources += [[(out_site(layer, specs), p, errors[layer][p])] for p in range(n_pos)]
    sources += [[("hook_embed", p, record["hook_embed"][0, p])] for p in range(n_pos)]
    generator = torch.Generator().manual_seed(0)
    sample = torch.randperm(graph.n_features, generator=generator)[:n_checked].tolist()
    checked = sorted(sample) + list(range(graph.n_features, len(sources)))
    sites = {site for writes in sources for site, _, _ in writes}
    embed = record["hook_embed"]
    removals = {site: embed.new_zeros(2 + len(checked), n_pos, embed.shape[-1]) for site in sites}
    for writes in sources:
        for site, position, vector in writes:
            removals[site][1, position] += vector.to(embed.dtype)
    for row, node in enumerate(checked, start=2):
        for site, position, vector in sources[node]:
            removals[site][row, position] += vector.to(embed.dtype)
    with torch.no_grad():
        values = frozen_values(model, specs, tokens, record, removals, graph, captured)
    return (values[0] - values[2:]).T, values[0] - values[1], checked


def clean_activations(specs: dict, record: dict, graph) -> torch.Tensor:
    acts = []
    for layer, position, latent in graph.features.tolist():
        spec = specs[layer]
        acts.append(spec.encode(record[spec.input_site][0, position])[latent])
    return torch.stack(acts)


def check_every_edge(model, transcoders: list, tokens: torch.Tensor, targets=None) -> None:
    """attribute()'s graph against the reference: sampled edges, row totals, the
    shape of the graph and the features' activations."""
    specs = specs_of(transcoders)
    graph = attribute(model, transcoders, tokens, batch_size=128, targets=targets)
    graph.validate()
    n_sources = graph.n_nodes - graph.n_logits
    targets = list(range(graph.n_features)) + [graph.logit_node(i) for i in range(graph.n_logits)]
    edges, totals, checked = reference(model, specs, tokens, graph)
    adjacency = graph.adjacency[targets][:, :n_sources].to(edges.dtype)
    exact = next(model.parameters()).dtype == torch.float64
    scale = edges.abs().max().item()
    atol = (1e-6 if exact else 1e-5) * scale  # some parts (rotary tables) stay float32
    assert ((adjacency[:, checked] - edges).abs() <= 1e-4 * edges.abs() + atol).all()
    assert torch.allclose(adjacency.sum(dim=1), totals, rtol=1e-4, atol=atol)
    # Error and token nodes are sources only; nothing points into a logit.
    assert not graph.adjacency[graph.n_features : n_sources].any()
    assert not graph.adjacency[:, n_sources:].any()
    record = record_clean(model, specs, tokens)
    activations = clean_activations(specs, record, graph)
    assert torch.allclose(graph.activations.to(edges.dtype), activations, rtol=1e-6, atol=1e-6)
    if getattr(model, "tokenizer", None) is not None:
        assert graph.features[:, 1].min() >= 1  # no feature nodes at the BOS position


COMBOS = [("topk", True), ("relu", False), ("jumprelu", True), ("topk", False)]
CASES = [(name, *COMBOS[i % len(COMBOS)]) for i, name in enumerate(MODEL_PARAMS)]


@pytest.mark.parametrize("name, activation, skip", CASES)
def test_every_edge_is_the_exact_effect_of_its_source(name, activation, skip):
    model = float64_model(name)
    check_every_edge(model, transcoders_for(model, activation, skip), prompt(model))


CLT_CASES = [(name, *COMBOS[(i + 1) % len(COMBOS)]) for i, name in enumerate(MODEL_PARAMS)]


@pytest.mark.parametrize("name, activation, skip", CLT_CASES)
def test_every_edge_of_a_cross_layer_transcoder_is_the_exact_effect_of_its_source(name, activation, skip):
    model = float64_model(name)
    dtype = next(model.parameters()).dtype
    clt = make_clt(model, layers=[0, 1, 2], activation=activation, skip=skip).to(dtype)
    clt.cfg.dtype = str(dtype).removeprefix("torch.")
    check_every_edge(model, [clt], prompt(model))


@pytest.mark.parametrize("name", [MODEL_PARAMS[0], "bridge-llama"])
def test_a_cross_layer_transcoder_with_a_transcoder_on_another_layer(name):
    model = float64_model(name)
    dtype = next(model.parameters()).dtype
    clt = make_clt(model, layers=[1, 2]).to(dtype)
    clt.cfg.dtype = str(dtype).removeprefix("torch.")
    check_every_edge(model, [transcoders_for(model, "relu", True)[0], clt], prompt(model))


@pytest.mark.parametrize("name", [MODEL_PARAMS[0], "bridge-llama"])
def test_without_transcoders_every_mlp_is_an_error_node(name):
    model = float64_model(name)
    tokens = prompt(model)
    graph = attribute(model, [], tokens)
    assert graph.n_features == 0
    edges, totals, checked = reference(model, specs_of([]), tokens, graph)
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


@pytest.mark.parametrize("name", [MODEL_PARAMS[0], "bridge-llama"])
def test_rows_spilled_to_a_file_give_the_same_graph(name, monkeypatch):
    import dataclasses
    import importlib

    attribution = importlib.import_module("tl_transcoders.attribution.attribute")

    model = build_model(name)
    transcoders = transcoders_for(model, "relu", True)
    tokens = prompt(model)
    options = dict(max_feature_nodes=12, batch_size=4, update_interval=2)
    in_memory = attribute(model, transcoders, tokens, **options)
    real_plan = attribution.plan
    monkeypatch.setattr(attribution, "plan", lambda **kw: dataclasses.replace(real_plan(**kw), spill=True))
    spilled = attribute(model, transcoders, tokens, **options)
    assert spilled.metadata["rows_spilled"] and not in_memory.metadata["rows_spilled"]
    assert torch.equal(spilled.features, in_memory.features)
    assert torch.equal(spilled.adjacency, in_memory.adjacency)


def test_the_row_store_reads_back_what_was_written_in_memory_or_in_a_file():
    from tl_transcoders.attribution.rows import RowStore

    n_rows, n_columns = 263, 50  # more than one block of 256
    values = torch.randn(n_rows, n_columns)
    stores = [RowStore(n_rows, n_columns, torch.float32, torch.device("cpu"), spill) for spill in (False, True)]
    for store in stores:
        for start in range(0, n_rows - 3, 40):  # the last 3 rows are never written: zeros
            store.write(start, values[start : min(start + 40, n_rows - 3)])
    expected = values.clone()
    expected[-3:] = 0
    rows, columns = torch.tensor([0, 258, 5, n_rows - 1]), torch.tensor([3, 0, 49])
    for store in stores:
        assert torch.equal(torch.cat(list(store.blocks(n_rows))), expected)
        assert torch.equal(store.gather(rows, columns), expected[rows[:, None], columns])
        store.close()


def test_the_memory_plan_spills_rows_and_shrinks_batches_to_fit_the_budget():
    from tl_transcoders.attribution.errors import AttributionError
    from tl_transcoders.attribution.memory import plan

    # A SmolLM2-sized prompt of 1,024 tokens with 3.3M active features and 1,034 rows.
    shape = dict(n_pos=1024, n_layers=30, d_model=576, n_features=3_300_000, n_rows=1034, max_active=200)
    shape |= dict(n_nodes=1034 + 31 * 1024, itemsize=4, base=2 << 30, held=1 << 29, forward=2 << 30, batch_size=64)
    roomy = plan(**shape, budget=None)
    assert roomy.spill and roomy.batch_size == 64  # 13 GiB of rows: a file whatever the budget
    short = plan(**(shape | dict(n_pos=64, n_features=170_000, n_nodes=1034 + 31 * 64)), budget=None)
    assert not short.spill and short.rows == 1034 * (170_000 + 31 * 64) * 4
    tight = plan(**shape, budget=8 << 30)
    assert tight.spill and tight.total <= 8 << 30 and tight.batch_size < 64
    assert tight.rows < 1034 * (3_300_000 + 31 * 1024) * 4 / 50
    with pytest.raises(AttributionError, match="memory budget of 3.00 GiB"):
        plan(**shape, budget=3 << 30)


def test_the_memory_estimate_is_the_plan_attribute_follows():
    from tl_transcoders.attribution.attribute import estimate_attribution_memory
    from tl_transcoders.attribution.errors import AttributionError

    model = build_model(MODEL_PARAMS[0])
    transcoders = transcoders_for(model, "relu", True)
    tokens = prompt(model)
    estimate = estimate_attribution_memory(model, transcoders, tokens, max_feature_nodes=8, batch_size=4)
    graph = attribute(model, transcoders, tokens, max_feature_nodes=8, batch_size=4)
    assert estimate.n_features == graph.metadata["n_active_features"]
    assert (estimate.batch_size, estimate.spill) == (graph.metadata["batch_size"], graph.metadata["rows_spilled"])
    assert estimate.forward > 0 and estimate.held > 0
    assert estimate.total > estimate.base + estimate.held + estimate.forward
    with pytest.raises(AttributionError, match="memory budget"):
        attribute(model, transcoders, tokens, memory_budget=1000)


def test_saved_tensor_bytes_counts_without_keeping_the_pass_alive():
    import gc
    import weakref

    from tl_transcoders.attribution.memory import SavedTensorBytes

    model = build_model(MODEL_PARAMS[0])
    x = torch.randn(100, 100, requires_grad=True)
    with SavedTensorBytes(model) as saved:
        y = x.exp()  # exp saves its own output
    assert saved.bytes == 100 * 100 * 4
    (gradient,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    assert torch.equal(gradient, y.detach())
    output = weakref.ref(y)
    del y
    gc.collect()
    assert output() is None


@pytest.mark.parametrize("name", [MODEL_PARAMS[0], "bridge-llama"])
def test_the_recorded_pass_is_freed_when_attribute_and_the_estimate_return(name, monkeypatch):
    import gc
    import importlib
    import weakref

    from tl_transcoders.attribution.attribute import estimate_attribution_memory

    attribution = importlib.import_module("tl_transcoders.attribution.attribute")
    recorded = []
    real_init = attribution.Attributor.__init__

    def init(self, model, state, bos, storage):
        recorded.extend(weakref.ref(t) for t in state.outputs.values())
        real_init(self, model, state, bos, storage)

    monkeypatch.setattr(attribution.Attributor, "__init__", init)
    model = build_model(name)
    transcoders = transcoders_for(model, "relu", True)
    estimate_attribution_memory(model, transcoders, prompt(model), max_feature_nodes=4)
    attribute(model, transcoders, prompt(model), max_feature_nodes=4)
    gc.collect()
    assert len(recorded) == 2 * model.cfg.n_layers
    assert all(tensor() is None for tensor in recorded)


def some_targets(model, transcoders) -> list:
    """One target of each kind: a logit, a logit difference, a residual direction at an
    inner position and the pre-activation of an (in)active latent of the last layer."""
    from tl_transcoders.attribution.targets import (
        FeaturePreActivation,
        LogitDifference,
        LogitTarget,
        ResidualDirection,
    )

    dtype = next(model.parameters()).dtype
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1), dtype=dtype)
    last = max(specs_of(transcoders))
    return [
        LogitTarget(5),
        LogitDifference(7, 3),
        ResidualDirection(1, 4, direction, label="probe"),
        FeaturePreActivation(last, 5, 2),
    ]


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_every_edge_into_chosen_targets_is_the_exact_effect_of_its_source(name):
    model = float64_model(name)
    transcoders = transcoders_for(model, "relu", True)
    check_every_edge(model, transcoders, prompt(model), targets=some_targets(model, transcoders))


def test_a_cross_layer_transcoders_edges_into_chosen_targets():
    model = float64_model(MODEL_PARAMS[0])
    clt = make_clt(model, layers=[0, 1, 2], activation="relu").to(torch.float64)
    clt.cfg.dtype = "float64"
    check_every_edge(model, [clt], prompt(model), targets=some_targets(model, [clt]))


def test_targets_are_recorded_exported_and_checked(without_type_checker):
    from tl_transcoders.attribution.export import graph_json
    from tl_transcoders.attribution.prune import prune
    from tl_transcoders.attribution.targets import FeaturePreActivation, LogitDifference, ResidualDirection

    model = build_model("bridge-llama")
    transcoders = transcoders_for(model, "relu", True)
    tokens = prompt(model)
    targets = some_targets(model, transcoders)
    graph = attribute(model, transcoders, tokens, targets=targets, max_feature_nodes=10)
    assert graph.n_logits == 4 and [t["kind"] for t in graph.metadata["targets"]] == [
        "logit",
        "logit_difference",
        "residual",
        "feature",
    ]
    assert graph.logit_tokens.tolist() == [5, -2, -3, -4]
    assert torch.allclose(graph.logit_probabilities, torch.full((4,), 0.25))
    assert graph.target_positions() == [6, 6, 4, 5]
    labels = graph.target_labels(model.tokenizer)
    assert labels[2].startswith("probe after block 1 at 4")
    pruned = prune(graph)
    assert pruned.graph.n_logits == 4 and pruned.graph.metadata["targets"] == graph.metadata["targets"]
    nodes = graph_json(graph, "targets", tokenizer=model.tokenizer)["nodes"]
    target_nodes = [n for n in nodes if n["feature_type"] == "logit"]
    assert len({n["node_id"] for n in target_nodes}) == 4
    assert any("probe" in n["clerp"] for n in target_nodes)
    bad = [
        (ResidualDirection(1, 99, targets[2].direction), "position 99 is out of range"),
        (ResidualDirection(1, 2, torch.zeros(3)), "direction must be a float tensor"),
        (FeaturePreActivation(1, 2, 0), "no transcoder replaces layer 1"),
        (LogitDifference(4, 4), "the two tokens are the same"),
        (LogitDifference(4, model.cfg.d_vocab), "not an id in the vocabulary"),
        ("logit", "is not a target"),
    ]
    for target, message in bad:
        with pytest.raises(ValueError, match=message):
            attribute(model, transcoders, tokens, targets=[target])
    with pytest.raises(ValueError, match="targets is empty"):
        attribute(model, transcoders, tokens, targets=[])
