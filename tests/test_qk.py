"""attribute_qk(): an attention score as contributions of pairs of nodes, each checked
by removing the node in the frozen model (as graph edges are in test_attribute)."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_PARAMS, make_clt
from test_attribute import float64_model, prompt, reference, specs_of, transcoders_for

from tl_transcoders.attribution.attribute import attribute
from tl_transcoders.attribution.errors import AttributionError
from tl_transcoders.attribution.qk import attribute_qk
from tl_transcoders.hooks.sites import attach

pytestmark = pytest.mark.filterwarnings("ignore:A forward hook edited hook_scale")

LAYER, HEAD, QUERY, KEY = 2, 1, 6, 3


def clean_log_pattern(model, tokens) -> torch.Tensor:
    """The log attention pattern of the head's query over the keys, on a clean pass."""
    site = f"blocks.{LAYER}.attn.hook_pattern"
    patterns = {}
    with torch.no_grad(), attach(model, [(site, lambda a: patterns.setdefault("p", a))]):
        model(tokens[None])
    return patterns["p"][0, HEAD, QUERY].log()


def check_qk(model, transcoders) -> None:
    tokens = prompt(model)
    qk = attribute_qk(model, transcoders, tokens, LAYER, HEAD, QUERY, KEY)
    # The pairs, the one-sided terms and the bias term add up to the model's own score.
    total = qk.pairs().sum() + qk.query_side().sum() + qk.key_side().sum() + qk.bias_term
    score = qk.score
    exact = next(model.parameters()).dtype == torch.float64
    tolerance = 1e-6 if exact else 1e-4  # float32 models: rounding
    assert abs(float(total) - score) <= tolerance * max(1.0, abs(score))
    # Against the model's own pattern: the scores of two keys differ by their log-ratio.
    other = attribute_qk(model, transcoders, tokens, LAYER, HEAD, QUERY, KEY - 1).score
    cap = getattr(model.cfg, "attn_scores_soft_cap", -1.0) or -1.0
    if cap > 0:
        score, other = (cap * torch.tanh(torch.tensor(v / cap)).item() for v in (score, other))
    log_pattern = clean_log_pattern(model, tokens)
    expected = float(log_pattern[KEY] - log_pattern[KEY - 1])
    assert abs((score - other) - expected) <= 10 * tolerance * max(1.0, abs(expected))
    # Each node's query and key contributions are its removal's effect in the frozen model.
    graph = attribute(model, transcoders, tokens)
    assert torch.equal(graph.features, qk.features)
    sites = {f"blocks.{LAYER}.attn.hook_q": None, f"blocks.{LAYER}.attn.hook_k": None}
    _, _, checked = reference(model, specs_of(transcoders), tokens, graph, captured=sites)
    q, k = sites[f"blocks.{LAYER}.attn.hook_q"], sites[f"blocks.{LAYER}.attn.hook_k"]
    kv_head = HEAD * k.shape[2] // q.shape[2]
    q, k = q[:, QUERY, HEAD].to(qk.query.dtype), k[:, KEY, kv_head].to(qk.key.dtype)
    scale = max(q.abs().max().item(), k.abs().max().item())
    for mine, theirs, bias in ((qk.query, q, qk.query_bias), (qk.key, k, qk.key_bias)):
        assert torch.allclose(mine[checked], theirs[0] - theirs[2:], rtol=1e-4, atol=1e-6 * scale)
        assert torch.allclose(bias, theirs[1], rtol=1e-4, atol=1e-6 * scale)  # every node removed


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_pair_contributions_sum_to_the_score_and_each_is_its_removal(name):
    model = float64_model(name)
    check_qk(model, transcoders_for(model, "relu", True))


def test_qk_attribution_through_a_cross_layer_transcoder():
    model = float64_model(MODEL_PARAMS[0])
    clt = make_clt(model, layers=[0, 1], activation="relu").to(torch.float64)
    clt.cfg.dtype = "float64"
    check_qk(model, [clt])


def test_top_pairs_are_the_largest_entries_and_bad_input_is_refused():
    model = float64_model(MODEL_PARAMS[0])
    transcoders = transcoders_for(model, "relu", True)
    tokens = prompt(model)
    qk = attribute_qk(model, transcoders, tokens, LAYER, HEAD, QUERY, KEY)
    pairs = qk.pairs()
    top = qk.top_pairs(5)
    tolerance = 1e-12 * float(pairs.abs().max())  # float64, computed blockwise: round-off only
    largest = pairs.flatten()[pairs.flatten().abs().topk(5).indices].tolist()
    assert [v for _, _, v in top] == pytest.approx(largest, abs=tolerance)
    assert all(abs(float(pairs[i, j]) - v) <= tolerance for i, j, v in top)
    assert qk.describe(0).startswith("feature L") and qk.describe(pairs.shape[0] - 1) == "token @ 6"
    with pytest.raises(AttributionError, match="a query attends only to keys at or before it"):
        attribute_qk(model, transcoders, tokens, LAYER, HEAD, 2, 5)
    with pytest.raises(AttributionError, match="head 9 is out of range"):
        attribute_qk(model, transcoders, tokens, LAYER, 9, QUERY, KEY)
    with pytest.raises(AttributionError, match="attends only to itself"):
        attribute_qk(model, transcoders, tokens, LAYER, HEAD, 0, 0)
    with pytest.raises(AttributionError, match="query_position 7 is out of range"):
        attribute_qk(model, transcoders, tokens, LAYER, HEAD, 7, KEY)
