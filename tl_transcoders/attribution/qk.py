"""`attribute_qk`: why a head attends where it does, as contributions of pairs of nodes.

For head `head` of layer `layer`, query position `q` and key position `k`, the attention
score (pre-softmax and before any soft-cap: `q_vec^T M k_vec`, `M` the scaled bilinear
form of the head, including its positional rotation where it has one) is decomposed in
the frozen replacement model, where the query and key vectors are affine in the nodes
(features, errors, tokens of the layers below `layer`, as in `attribute`):

    q_vec = sum_i Q[i] + q_bias        k_vec = sum_j K[j] + k_bias
    score = sum_ij Q[i]^T M K[j] + sum_i Q[i]^T M k_bias + sum_j q_bias^T M K[j] + q_bias^T M k_bias

`Q[i]` is node i's contribution to the query (one row of its `d_head` components per
backward pass, as graph rows are), `q_bias` what no node explains (the query bias,
the attention outputs' biases and the transcoders' output biases through the frozen
layers). `M` is read from the model itself, from the attention pattern of a forward pass with
the head's query set to each unit vector and its keys to zero (see `_score_form`), so
it is exact through any rotation and on both model classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_transcoders.attribution.attribute import Attributor, Injection, starts_with_bos
from tl_transcoders.attribution.errors import AttributionError
from tl_transcoders.attribution.replacement import frozen_replacement
from tl_transcoders.core.errors import check_at_least, whole_number
from tl_transcoders.core.placement import AnyTranscoder
from tl_transcoders.hooks.sites import attach, model_device
from tl_transcoders.hooks.splice import check_not_spliced
from tl_transcoders.hooks.tokens import prompt_tokens

__all__ = ["QKAttribution", "attribute_qk"]


@dataclass
class QKAttribution:
    """The decomposition of one attention score (see the module docstring).

    Node columns are those of a graph's rows: every active feature (`features`, rows of
    (layer, position, latent), BOS excluded as in `attribute`), then the error nodes
    (layer-major, `n_layers * n_pos`), then the token nodes (`n_pos`)."""

    layer: int
    head: int
    query_position: int
    key_position: int
    tokens: Int[Tensor, " n_pos"]
    features: Int[Tensor, "n_features 3"]
    n_layers: int
    query: Float[Tensor, "n_nodes d_head"]  # Q[i]: node i's contribution to the query
    key: Float[Tensor, "n_nodes d_head"]  # K[j]
    query_bias: Float[Tensor, " d_head"]
    key_bias: Float[Tensor, " d_head"]
    form: Float[Tensor, "d_head d_head"]  # M: score = q_vec^T M k_vec

    @property
    def score(self) -> float:
        """The attention score: `q_vec^T M k_vec`."""
        q = self.query.sum(0) + self.query_bias
        k = self.key.sum(0) + self.key_bias
        return float(q @ self.form @ k)

    def pairs(self) -> Float[Tensor, "n_nodes n_nodes"]:
        """`pairs[i, j]`: node i on the query side times node j on the key side (dense:
        n_nodes^2 values; see `top_pairs` for long prompts)."""
        return self.query @ self.form @ self.key.T

    def query_side(self) -> Float[Tensor, " n_nodes"]:
        """Each node's query-side term with the key's bias: `Q[i]^T M k_bias`."""
        return self.query @ (self.form @ self.key_bias)

    def key_side(self) -> Float[Tensor, " n_nodes"]:
        """Each node's key-side term with the query's bias: `q_bias^T M K[j]`."""
        return self.key @ (self.form.T @ self.query_bias)

    @property
    def bias_term(self) -> float:
        """`q_bias^T M k_bias`."""
        return float(self.query_bias @ self.form @ self.key_bias)

    def top_pairs(self, n: int = 20) -> list[tuple[int, int, float]]:
        """The `n` pairs (query node, key node, contribution) of largest magnitude,
        without building the whole matrix (one block of query nodes at a time)."""
        check_at_least(AttributionError, 1, n=n)
        keys = self.form @ self.key.T
        best: list[tuple[int, int, float]] = []
        for start in range(0, self.query.shape[0], 1024):
            block = self.query[start : start + 1024] @ keys
            values, flat = block.flatten().abs().topk(min(n, block.numel()))
            for flat_index in flat.tolist():
                i, j = divmod(flat_index, block.shape[1])
                best.append((start + i, j, float(block[i, j])))
            best = sorted(best, key=lambda pair: -abs(pair[2]))[:n]
        return best

    def describe(self, node: int) -> str:
        """A node's name: `feature L{layer} #{latent} @ {position}`, `error L{layer} @
        {position}` or `token @ {position}`."""
        n_features, n_pos = self.features.shape[0], self.tokens.shape[0]
        n_nodes = self.query.shape[0]
        if whole_number(node) is None or not 0 <= node < n_nodes:
            raise AttributionError(f"node {node!r} is out of range: the decomposition has {n_nodes} nodes")
        if node < n_features:
            layer, position, latent = self.features[node].tolist()
            return f"feature L{layer} #{latent} @ {position}"
        node -= n_features
        if node < self.n_layers * n_pos:
            return f"error L{node // n_pos} @ {node % n_pos}"
        return f"token @ {node - self.n_layers * n_pos}"


def attribute_qk(
    model: nn.Module,
    transcoders: AnyTranscoder | Sequence[AnyTranscoder],
    prompt_or_tokens: str | Tensor,
    layer: int,
    head: int,
    query_position: int,
    key_position: int,
) -> QKAttribution:
    """Decompose the attention score of `head` of `layer` from `query_position` to
    `key_position` into contributions of pairs of nodes (see the module docstring).
    `transcoders` as for `attribute` (they shape the nodes below `layer`)."""
    check_not_spliced(model, "attribute_qk")
    tokens = prompt_tokens(model, prompt_or_tokens)
    n_pos = int(tokens.shape[0])
    checked = {}
    for name, value, bound in (
        ("layer", layer, model.cfg.n_layers),
        ("head", head, model.cfg.n_heads),
        ("query_position", query_position, n_pos),
        ("key_position", key_position, n_pos),
    ):
        whole = whole_number(value)
        if whole is None:
            raise AttributionError(f"{name} must be an integer, got {value!r}")
        if not 0 <= whole < bound:
            within = f"the prompt has {n_pos} tokens" if name.endswith("position") else f"[0, {bound})"
            raise AttributionError(f"{name} {whole} is out of range: {within}")
        checked[name] = whole
    layer, head, query_position, key_position = checked.values()
    if key_position > query_position:
        raise AttributionError(
            f"key_position {key_position} is after query_position {query_position}: a query attends only to "
            "keys at or before it"
        )
    if query_position == 0:
        raise AttributionError("query_position 0 attends only to itself (its pattern is 1 whatever the score)")
    with torch.enable_grad(), frozen_replacement(model, transcoders, attention_layers=[layer]) as state:
        model(tokens[None])
    q, k = state.queries[layer], state.keys[layer]
    kv_head = head * k.shape[2] // q.shape[2]  # grouped-query attention shares a key head
    attributor = Attributor(model, state, starts_with_bos(model, tokens), model_device(model))
    query, query_bias = _contributions(attributor, ("query", layer), q, query_position, head)
    key, key_bias = _contributions(attributor, ("key", layer), k, key_position, kv_head)
    form = _score_form(model, tokens, layer, head, kv_head, query_position, key_position, q.detach(), k.detach())
    features = attributor.features
    return QKAttribution(
        layer=layer,
        head=head,
        query_position=query_position,
        key_position=key_position,
        tokens=tokens.cpu(),
        features=torch.stack([features.layers, features.positions, features.latents], dim=1).cpu(),
        n_layers=model.cfg.n_layers,
        query=query,
        key=key,
        query_bias=query_bias,
        key_bias=key_bias,
        form=form.to(query.dtype),
    )


def _contributions(
    attributor: Attributor, site: tuple[str, int], tensor: Tensor, position: int, head: int
) -> tuple[Tensor, Tensor]:
    """Every node's contribution `[n_nodes, d_head]` to one head's vector at `position`
    of a recorded query or key tensor, and the part no node explains."""
    d_head, layer = tensor.shape[-1], site[1]
    units = []
    for component in range(d_head):
        unit = tensor.new_zeros(tensor.shape[2:])
        unit[head, component] = 1
        units.append(Injection(site, position, unit, layer))
    rows = attributor.rows_for(units)  # [d_head, n_nodes]
    value = tensor[0, position, head].detach().to(rows.dtype)
    return rows.T.contiguous(), value - rows.sum(dim=1)


def _score_form(
    model: nn.Module,
    tokens: Tensor,
    layer: int,
    head: int,
    kv_head: int,
    query_position: int,
    key_position: int,
    q: Tensor,
    k: Tensor,
) -> Float[Tensor, "d_head d_head"]:
    """`M` with score = q^T M k for this head and these positions, read from the
    attention pattern of one pass of `d_head` rows: in row a the query is unit vector a,
    every key of the head up to the query is zero except the one at `key_position`, a
    zero leaf. Then every other score is exactly 0, so the score is the log-ratio of two
    pattern entries (exact through the softmax, and a soft-cap's slope at zero is 1),
    and its gradient with respect to row a's key is M's row a."""
    d_head = q.shape[-1]
    other = next(p for p in range(query_position + 1) if p != key_position)
    leaf = q.new_zeros(d_head, d_head, requires_grad=True)
    queries = q.expand(d_head, *q.shape[1:]).clone()
    queries[:, query_position, head] = torch.eye(d_head, dtype=q.dtype, device=q.device)
    keys = k.expand(d_head, *k.shape[1:]).clone()
    keys[:, : query_position + 1, kv_head] = 0
    patterns: dict[str, Tensor] = {}

    def key_hook(activation: Tensor) -> Tensor:
        delta = torch.zeros_like(keys)
        delta[:, key_position, kv_head] = leaf
        return keys + delta

    def read(activation: Tensor) -> None:
        patterns["pattern"] = activation[:, head, query_position]

    hooks = [
        (f"blocks.{layer}.attn.hook_q", lambda activation: queries),
        (f"blocks.{layer}.attn.hook_k", key_hook),
        (f"blocks.{layer}.attn.hook_pattern", read),
    ]
    with torch.enable_grad(), attach(model, hooks):
        model(tokens[None].expand(d_head, -1))
    pattern = patterns["pattern"]
    score = pattern[:, key_position].log() - pattern[:, other].log()
    (form,) = torch.autograd.grad(score.sum(), leaf)
    return form
