"""`attribute`: the attribution graph of one prompt.

One forward pass of the frozen replacement model (`replacement.py`) is recorded; then
each graph row (a target node) is one vector-Jacobian product through it. Rows are
computed in batches, the batch dimension carrying different targets, with one batched
backward pass per batch (`is_grads_batched`, so the forward pass is never repeated).
Gradients are read once per layer at the MLP output site and contracted with every
active feature's decoder vector in one batched matmul per layer (features are laid out
per position, `[n_pos, k, d]`), so the cost does not grow with hooks per feature and no
latents-wide tensor is ever built per row.

With `max_feature_nodes`, rows are computed as in circuit-tracer: the logit rows first,
then feature rows in order of their influence on the logits (recomputed from the rows
known so far every `update_interval` batches); the graph keeps the features whose rows
were computed.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_transcoders.attribution.errors import AttributionError
from tl_transcoders.attribution.graph import Graph
from tl_transcoders.attribution.memory import (
    DECODE_BLOCK_BYTES,
    AttributionMemory,
    SavedTensorBytes,
    available_memory,
    current_memory,
    plan,
    return_freed_memory,
    tensor_bytes,
)
from tl_transcoders.attribution.replacement import (
    ReplacementState,
    check_finite_logits,
    frozen_replacement,
    layer_maps,
    writers,
)
from tl_transcoders.attribution.rows import RowStore
from tl_transcoders.attribution.targets import (
    LogitDifference,
    LogitTarget,
    ResidualDirection,
    Target,
    check_targets,
    target_record,
)
from tl_transcoders.core.activations import SparseLatents
from tl_transcoders.core.devices import checked_device
from tl_transcoders.core.placement import AnyTranscoder
from tl_transcoders.hooks.sites import model_device, model_name
from tl_transcoders.hooks.splice import check_not_spliced
from tl_transcoders.hooks.tokens import prompt_tokens

__all__ = [
    "ActiveFeatures",
    "Attributor",
    "Injection",
    "active_features",
    "attribute",
    "estimate_attribution_memory",
    "most_probable_tokens",
    "partial_influences",
    "starts_with_bos",
]


def attribute(
    model: nn.Module,
    transcoders: AnyTranscoder | Sequence[AnyTranscoder],
    prompt_or_tokens: str | Tensor,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = None,
    batch_size: int = 64,
    update_interval: int = 4,
    device: str | torch.device | None = None,
    memory_budget: int | None = None,
    targets: Sequence[Target] | None = None,
) -> Graph:
    """The attribution graph of a prompt (see `Graph` for nodes and edge convention).

    Args:
        model: a `HookedTransformer` or `TransformerBridge`.
        transcoders: per-layer transcoders and cross-layer transcoders, at most one
            per layer; layers without one have only error nodes. A cross-layer
            transcoder's feature sits at its encoder's layer, and its edges run through
            all its decoders.
        prompt_or_tokens: a string (tokenized with the model's tokenizer, which adds
            BOS as the model does) or token ids. If position 0 is the tokenizer's BOS
            token it gets no feature nodes (its features' outputs join its error node).
        max_n_logits, desired_logit_prob: the logit nodes are the most probable next
            tokens, as few as cover `desired_logit_prob`, at most `max_n_logits`.
        max_feature_nodes: keep at most this many features, chosen by influence on the
            logits; None keeps every active feature.
        batch_size: rows (targets) per backward pass, at most (smaller where the
            memory budget needs it).
        update_interval: batches between recomputations of the feature influences.
        device: where the edges are kept (default: the model's device).
        memory_budget: bytes the call may hold at its peak, the model included (this
            process's resident memory on the CPU, allocated memory on a GPU); default:
            most of what is available. The rows go to a temporary file and the batches
            shrink where they would not fit (`estimate_attribution_memory` predicts it);
            `AttributionError` if even that cannot fit.
        targets: what the graph explains instead of the top logits (`targets.py`: a
            logit, a logit difference, a residual-stream direction, a feature's
            pre-activation), one target node each, weighted equally for the influence
            ordering and pruning; `graph.metadata["targets"]` describes them.

    Logit targets are the logits before any output soft-cap, minus their mean."""
    options = _Options(max_n_logits, desired_logit_prob, max_feature_nodes, batch_size, update_interval, memory_budget)
    tokens, recorded, attributor, memory = _prepare(
        model, transcoders, prompt_or_tokens, "attribute", options, device, targets
    )
    logit_tokens, logit_probabilities = recorded.logit_tokens, recorded.logit_probabilities
    rows, row_features, n_logit_rows = attributor.rows(
        recorded.targets, logit_probabilities, max_feature_nodes, memory, update_interval
    )
    recorded.state.release_graph()  # the backward passes are done: the adjacency may use that memory
    return_freed_memory()  # and what the backward batches freed, which the allocator would otherwise keep
    adjacency = attributor.adjacency(rows, row_features, n_logit_rows)
    rows.close()
    features = attributor.features
    selected = row_features[n_logit_rows:].sort().values
    state = recorded.state
    tokenizer = getattr(model, "tokenizer", None)
    described = {} if targets is None else {"targets": [target_record(t, tokenizer) for t in recorded.targets]}
    return Graph(
        tokens=tokens.cpu(),
        features=torch.stack([features.layers, features.positions, features.latents], dim=1)[selected].cpu(),
        activations=features.activations[selected].float().cpu(),
        n_layers=model.cfg.n_layers,
        logit_tokens=logit_tokens.cpu(),
        logit_probabilities=logit_probabilities.cpu(),
        adjacency=adjacency,
        prompt=prompt_or_tokens if isinstance(prompt_or_tokens, str) else None,
        model_name=model_name(model),
        metadata={
            "transcoders": [
                {
                    "layer": layer,
                    "input_site": m.input_site,
                    "output_site": m.output_site,
                    "writes_into": sorted(m.decoders()),
                }
                for layer, m in sorted(state.maps.items())
            ],
            "bos_without_features": attributor.bos,
            "max_n_logits": max_n_logits,
            "desired_logit_prob": desired_logit_prob,
            "max_feature_nodes": max_feature_nodes,
            "n_active_features": features.n,
            "batch_size": memory.batch_size,
            "rows_spilled": memory.spill,
            **described,
        },
    )


def estimate_attribution_memory(
    model: nn.Module,
    transcoders: AnyTranscoder | Sequence[AnyTranscoder],
    prompt_or_tokens: str | Tensor,
    **options: Any,
) -> AttributionMemory:
    """The peak memory `attribute(model, transcoders, prompt_or_tokens, **options)` would
    reach, by part, and the batch size and row storage it would choose
    (`AttributionMemory`), from one forward pass of the replacement model (no backward
    pass). `options` are `attribute`'s keyword arguments, with its defaults. Raises
    `AttributionError` where `attribute` would, including when nothing fits
    `memory_budget`."""
    try:
        call = inspect.signature(attribute).bind(model, transcoders, prompt_or_tokens, **options)
    except TypeError as err:
        raise AttributionError(f"estimate_attribution_memory takes attribute's arguments: {err}") from None
    call.apply_defaults()
    given = call.arguments
    checked = _Options(**{field.name: given[field.name] for field in dataclasses.fields(_Options)})
    _, recorded, attributor, memory = _prepare(
        model, transcoders, prompt_or_tokens, "estimate_attribution_memory", checked, given["device"], given["targets"]
    )
    del recorded, attributor  # the recorded pass's tensors
    return_freed_memory()
    return memory


@dataclass
class _Recorded:
    """One recorded pass of the replacement model: its state, the targets (checked; the
    top logits by default), their tokens (-1 - rank for targets that are not one logit)
    and weights, the memory in use before it (`base`) and the bytes its autograd graph
    keeps."""

    state: ReplacementState
    targets: list[Target]
    logit_tokens: Tensor
    logit_probabilities: Tensor
    base: int
    forward: int


def _record(
    model: nn.Module,
    transcoders: AnyTranscoder | Sequence[AnyTranscoder],
    tokens: Tensor,
    max_n_logits: int,
    desired_logit_prob: float,
    storage: torch.device,
    targets: Sequence[Target] | None,
) -> _Recorded:
    base = current_memory(storage)
    if targets is not None:
        widths = {m.layer: m.d_latent for m in layer_maps(model, transcoders).values()}
        targets = check_targets(model, targets, int(tokens.shape[0]), widths)
    residual_layers = sorted({t.layer for t in targets or () if isinstance(t, ResidualDirection)})
    with (
        torch.enable_grad(),
        frozen_replacement(model, transcoders, residual_layers) as state,
        SavedTensorBytes(model) as saved,
    ):
        last = model(tokens[None])[0, -1].detach()  # the other positions' logits are freed here
    check_finite_logits(last, "the replacement model")
    if targets is None:
        probabilities = torch.softmax(last.float(), dim=-1)
        logit_tokens, logit_probabilities = most_probable_tokens(probabilities, max_n_logits, desired_logit_prob)
        targets = [LogitTarget(int(t)) for t in logit_tokens.tolist()]
    else:
        ids = [t.token if isinstance(t, LogitTarget) else -1 - rank for rank, t in enumerate(targets)]
        logit_tokens = torch.tensor(ids, device=last.device)
        logit_probabilities = torch.full((len(targets),), 1 / len(targets), device=last.device)
    return _Recorded(state, targets, logit_tokens, logit_probabilities, base, saved.bytes)


@dataclass(frozen=True)
class _Options:
    """`attribute`'s numeric options, checked when built."""

    max_n_logits: int
    desired_logit_prob: float
    max_feature_nodes: int | None
    batch_size: int
    update_interval: int
    memory_budget: int | None

    def __post_init__(self) -> None:
        for name in ("max_n_logits", "batch_size", "update_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AttributionError(f"{name} must be an integer of at least 1, got {value!r}")
        if not 0 < self.desired_logit_prob <= 1:
            raise AttributionError(f"desired_logit_prob must be in (0, 1], got {self.desired_logit_prob}")
        if self.max_feature_nodes is not None and self.max_feature_nodes < 0:
            raise AttributionError(f"max_feature_nodes must be None or non-negative, got {self.max_feature_nodes}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise AttributionError(f"memory_budget must be a positive number of bytes, got {self.memory_budget}")


def _prepare(
    model: nn.Module,
    transcoders: AnyTranscoder | Sequence[AnyTranscoder],
    prompt_or_tokens: str | Tensor,
    caller: str,
    options: _Options,
    device: str | torch.device | None,
    targets: Sequence[Target] | None,
) -> tuple[Tensor, _Recorded, Attributor, AttributionMemory]:
    """The checked prompt tokens, the recorded forward pass, its `Attributor` and the
    memory plan that `attribute` and `estimate_attribution_memory` both start from."""
    check_not_spliced(model, caller)
    tokens = prompt_tokens(model, prompt_or_tokens)
    storage = checked_device(device) or model_device(model)
    recorded = _record(model, transcoders, tokens, options.max_n_logits, options.desired_logit_prob, storage, targets)
    attributor = Attributor(model, recorded.state, starts_with_bos(model, tokens), storage)
    memory = attributor.plan(recorded, options.max_feature_nodes, options.batch_size, options.memory_budget)
    return tokens, recorded, attributor, memory


def starts_with_bos(model: nn.Module, tokens: Int[Tensor, " n_pos"]) -> bool:
    """True if position 0 holds the tokenizer's BOS token."""
    tokenizer = getattr(model, "tokenizer", None)
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    return bos is not None and int(tokens[0]) == bos


def most_probable_tokens(
    probabilities: Float[Tensor, " d_vocab"], max_n_logits: int, desired_logit_prob: float
) -> tuple[Int[Tensor, " n_logits"], Float[Tensor, " n_logits"]]:
    """The most probable tokens, as few as reach `desired_logit_prob` in total, at most
    `max_n_logits`, and their probabilities."""
    top_p, top_ids = probabilities.topk(min(max_n_logits, probabilities.numel()))
    target = torch.tensor(desired_logit_prob, device=top_p.device, dtype=top_p.dtype)
    cutoff = int(torch.searchsorted(top_p.cumsum(0), target)) + 1
    return top_ids[:cutoff], top_p[:cutoff]


@dataclass
class ActiveFeatures:
    """Every active feature (except at a BOS position), in node order: by layer,
    position, latent. `sparse[layer]` holds each position's features at that layer
    (values zeroed in slots that are not nodes, indices sorted), `[n_pos, k]`;
    `slots[layer]` are the flat `n_pos * k` slots that hold nodes, in node order;
    `offsets[layer]` the index of the layer's first feature."""

    layers: Int[Tensor, " n"]
    positions: Int[Tensor, " n"]
    latents: Int[Tensor, " n"]
    activations: Float[Tensor, " n"]
    sparse: dict[int, SparseLatents]
    slots: dict[int, Tensor]
    offsets: dict[int, int]

    @property
    def n(self) -> int:
        return int(self.layers.shape[0])


def active_features(state: ReplacementState, bos: bool) -> ActiveFeatures:
    """Collect the active features of every replaced layer from a replacement pass."""
    columns: list[list[Tensor]] = [[], [], [], []]
    sparse, slots, offsets = {}, {}, {}
    n = 0
    for layer in sorted(state.maps):
        values, indices = state.latents(layer)
        active = values != 0
        if bos:
            active[0] = False
        # Each position's nodes first, by latent, then as few padding slots as the
        # widest position needs (a BOS position's many latents are not nodes).
        d_latent = state.maps[layer].d_latent
        keyed, order = torch.where(active, indices, d_latent).sort(dim=-1, stable=True)
        counts = active.sum(dim=-1)
        width = int(counts.max()) if counts.numel() else 0
        values = (values * active).gather(-1, order)[:, :width]
        indices = keyed[:, :width].clamp(max=d_latent - 1)
        active = torch.arange(width, device=counts.device) < counts[:, None]
        position, slot = active.nonzero(as_tuple=True)
        sparse[layer] = SparseLatents(values, indices)
        slots[layer] = position * indices.shape[1] + slot
        offsets[layer] = n
        n += int(position.numel())
        columns[0].append(torch.full_like(position, layer))
        columns[1].append(position)
        columns[2].append(indices[position, slot])
        columns[3].append(values[position, slot])
    device = state.embed.device
    layers, positions, latents, acts = (
        torch.cat(c) if c else torch.zeros(0, dtype=dtype, device=device)
        for c, dtype in zip(columns, (torch.long,) * 3 + (state.embed.dtype,))
    )
    return ActiveFeatures(layers, positions, latents, acts, sparse, slots, offsets)


class Injection(NamedTuple):
    """A target's row, as the gradient to inject: `vector` (shaped as one position of
    the site) at `position` of `site` (`"unembed"`, or `(kind, layer)` with kind
    `"input"`, `"residual"`, `"query"` or `"key"`: a recorded tensor of
    `ReplacementState`), reading source gradients at the MLP outputs of the layers below
    `n_read`."""

    site: Any
    position: int
    vector: Tensor
    n_read: int


class Attributor:
    """Computes graph rows from one recorded replacement pass.

    Row columns: every active feature, then the errors (layer-major), then the tokens.
    A feature's edge into a target sums, over every layer its decoders write into, the
    target's gradient there dotted with the decoder vector (one layer for a per-layer
    transcoder's feature, its layer and every later one for a cross-layer one)."""

    def __init__(self, model: nn.Module, state: ReplacementState, bos: bool, storage: torch.device):
        self.model, self.state, self.bos, self.storage = model, state, bos, storage
        self.maps = state.maps
        self.writers = writers(state.maps)
        self.n_layers, self.n_pos = model.cfg.n_layers, state.embed.shape[1]
        self.features = active_features(state, bos)
        self.errors = {layer: state.error(layer) for layer in range(self.n_layers)}
        if bos:
            self._move_bos_features_into_errors()
        self.embed = state.embed[0].detach()
        self.dtype = torch.promote_types(self.embed.dtype, torch.float32)
        self.n_columns = self.features.n + (self.n_layers + 1) * self.n_pos

    def _move_bos_features_into_errors(self) -> None:
        """Position 0 has no feature nodes: its features' outputs join its error nodes."""
        for target, pairs in self.writers.items():
            for source, W in pairs:
                values, indices = self.state.latents(source)
                decoded = values[0] @ W[indices[0]]
                self.errors[target][0] += decoded.to(self.errors[target].dtype)

    def held_tensors(self) -> list[Tensor]:
        """The tensors kept from the recorded pass until the graph is built (besides
        its autograd graph): the features, the error vectors and embeddings, each
        layer's latents, inputs and MLP outputs."""
        features, state = self.features, self.state
        held = [features.layers, features.positions, features.latents, features.activations]
        held += [t for layer in features.sparse for t in (*features.sparse[layer], features.slots[layer])]
        held += [*self.errors.values(), self.embed, *state.mlp_outputs.values(), *state.inputs.values()]
        held += [t for layer in self.maps for t in state.latents(layer)]
        return held

    def plan(
        self, recorded: _Recorded, max_feature_nodes: int | None, batch_size: int, memory_budget: int | None
    ) -> AttributionMemory:
        """The batch size and row storage for computing this prompt's rows within
        `memory_budget` (default: `available_memory`), and the predicted peak."""
        n_features = self.features.n
        n_rows = int(recorded.logit_tokens.shape[0])
        n_rows += n_features if max_feature_nodes is None else min(max_feature_nodes, n_features)
        widths = [self.features.sparse[layer].indices.shape[-1] for layer in self.maps]
        budget = memory_budget if memory_budget is not None else available_memory(self.storage)
        return plan(
            n_pos=self.n_pos,
            n_layers=self.n_layers,
            d_model=self.embed.shape[-1],
            n_features=n_features,
            n_rows=n_rows,
            n_nodes=self.n_columns - n_features + n_rows,
            max_active=max(widths, default=0),
            itemsize=self.dtype.itemsize,
            base=recorded.base,
            held=tensor_bytes(self.held_tensors()),
            forward=recorded.forward,
            batch_size=batch_size,
            budget=budget,
        )

    def rows(
        self,
        targets: list[Target],
        logit_probabilities: Tensor,
        max_feature_nodes: int | None,
        memory: AttributionMemory,
        update_interval: int,
    ) -> tuple[RowStore, Tensor, int]:
        """All computed rows `[n_rows, n_columns]` (kept as `memory` says), the feature
        (index into `self.features`) of each row (-1 for logit rows) and the number of
        logit rows, which come first."""
        n_features = self.features.n
        budget = n_features if max_feature_nodes is None else min(max_feature_nodes, n_features)
        n_logits = len(targets)
        batch_size = memory.batch_size
        rows = RowStore(n_logits + budget, self.n_columns, self.dtype, self.storage, memory.spill)
        row_features = torch.full((n_logits + budget,), -1, dtype=torch.long, device="cpu")  # bookkeeping
        injections = [self._target_injection(target) for target in targets]
        for start in range(0, n_logits, batch_size):
            rows.write(start, self.rows_for(injections[start : start + batch_size]))
        visited = torch.zeros(n_features, dtype=torch.bool, device="cpu")
        filled = n_logits
        while filled < n_logits + budget:
            if budget == n_features:
                pending = torch.arange(n_features)
            else:
                influence = partial_influences(rows, filled, row_features[:filled], logit_probabilities)
                ranked = influence[:n_features].argsort(descending=True).cpu()
                queue = min(update_interval * batch_size, n_logits + budget - filled)
                pending = ranked[~visited[ranked]][:queue]
            # Batches of similar layers need backward passes through fewer layers.
            pending = pending[self.features.layers[pending].cpu().argsort(descending=True, stable=True)]
            for start in range(0, pending.numel(), batch_size):
                batch = pending[start : start + batch_size]
                rows.write(filled, self._feature_rows(batch))
                row_features[filled : filled + batch.numel()] = batch
                visited[batch] = True
                filled += batch.numel()
        return rows, row_features, n_logits

    def _target_injection(self, target: Target) -> Injection:
        """Where and what to inject for one target's row."""
        if isinstance(target, (LogitTarget, LogitDifference)):
            W_U = self.model.W_U.detach()
            if isinstance(target, LogitTarget):
                vector = W_U[:, target.token] - W_U.mean(dim=1)
            else:
                vector = W_U[:, target.token] - W_U[:, target.other]
            return Injection("unembed", self.n_pos - 1, vector, self.n_layers)
        if isinstance(target, ResidualDirection):
            return Injection(("residual", target.layer), target.position, target.direction, target.layer + 1)
        W_enc = self.maps[target.layer].W_enc
        return Injection(("input", target.layer), target.position, W_enc[target.latent], target.layer)

    def _feature_rows(self, batch: Tensor) -> Tensor:
        features = self.features
        layers, positions, latents = (features.layers[batch], features.positions[batch], features.latents[batch])
        return self.rows_for(
            [
                Injection(("input", layer), position, self.maps[layer].W_enc[latent], layer)
                for layer, position, latent in zip(layers.tolist(), positions.tolist(), latents.tolist())
            ]
        )

    def rows_for(self, injections: list[Injection]) -> Tensor:
        """The rows of a batch of targets: each injection's vector is the gradient at its
        site and position, one row each, in one batched backward pass."""
        by_site: dict[Any, list[int]] = {}
        for row, injection in enumerate(injections):
            by_site.setdefault(injection.site, []).append(row)
        outputs, grads = [], []
        for site in sorted(by_site, key=str):
            tensor = self._site(site)
            grad = tensor.new_zeros(len(injections), *tensor.shape)
            rows = by_site[site]
            positions = [injections[r].position for r in rows]
            grad[rows, 0, positions] = torch.stack([injections[r].vector for r in rows]).to(grad.dtype)
            outputs.append(tensor)
            grads.append(grad)
        return self._backward(outputs, grads, max(injection.n_read for injection in injections))

    def _site(self, site: Any) -> Tensor:
        """The recorded tensor of an injection site."""
        if site == "unembed":
            return self.state.unembed_input
        kind, layer = site
        recorded = {
            "input": self.state.inputs,
            "residual": self.state.residuals,
            "query": self.state.queries,
            "key": self.state.keys,
        }
        return recorded[kind][layer]

    def _backward(self, outputs: list[Tensor], grads: list[Tensor], n_read: int) -> Tensor:
        """Rows for targets injected as `grads` (batched) at `outputs`, reading source
        gradients at the MLP outputs of layers below `n_read` and at the embedding."""
        read = [self.state.outputs[layer] for layer in range(n_read)] + [self.state.embed]
        gradients = torch.autograd.grad(
            outputs, read, grads, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        batch = grads[0].shape[0]
        row = self.embed.new_zeros(batch, self.n_columns)
        features, n_pos = self.features, self.n_pos
        error_start = features.n
        for layer, gradient in enumerate(gradients[:-1]):
            if gradient is None:
                continue
            gradient = gradient[:, 0]
            for source, W in self.writers.get(layer, []):
                slots = features.slots[source]
                if not slots.numel():
                    continue
                values, indices = features.sparse[source]
                width = indices.shape[1]
                offset = features.offsets[source]
                # Positions a block at a time: at most DECODE_BLOCK_BYTES of decoder vectors.
                step = max(1, DECODE_BLOCK_BYTES // (width * W.shape[1] * gradient.element_size()))
                for first in range(0, n_pos, step):
                    last = min(first + step, n_pos)
                    bounds = torch.tensor([first * width, last * width], device=slots.device)
                    lo, hi = torch.searchsorted(slots, bounds).tolist()
                    if lo == hi:
                        continue
                    active_rows = W[indices[first:last]].to(gradient.dtype)  # active latents' rows only
                    decoders = values[first:last, :, None].to(gradient.dtype) * active_rows
                    edges = torch.bmm(gradient[:, first:last].transpose(0, 1), decoders.transpose(1, 2))
                    flat = edges.transpose(0, 1).reshape(batch, -1)
                    row[:, offset + lo : offset + hi] += flat[:, slots[lo:hi] - first * width]
            errors = self.errors[layer].to(gradient.dtype)
            start = error_start + layer * n_pos
            row[:, start : start + n_pos] = torch.einsum("bpd,pd->bp", gradient, errors)
        if gradients[-1] is not None:
            start = error_start + self.n_layers * n_pos
            row[:, start:] = torch.einsum("bpd,pd->bp", gradients[-1][:, 0], self.embed)
        return row

    def adjacency(self, rows: RowStore, row_features: Tensor, n_logit_rows: int) -> Float[Tensor, "n_nodes n_nodes"]:
        """The graph's adjacency from the computed rows: the features with rows, all
        errors and tokens, then the logits."""
        selected, order = row_features[n_logit_rows:].sort()
        others = torch.arange(self.features.n, self.n_columns, device=self.storage)
        columns = torch.cat([selected.to(self.storage), others])
        n_sources, n_selected = columns.numel(), selected.numel()
        n_nodes = n_sources + n_logit_rows
        adjacency = torch.zeros(n_nodes, n_nodes, device=self.storage, dtype=rows.dtype)
        # Gathering rows and columns in one indexing step copies only the kept block.
        feature_rows = (order + n_logit_rows).to(self.storage)
        adjacency[:n_selected, :n_sources] = rows.gather(feature_rows, columns)
        logit_rows = torch.arange(n_logit_rows, device=self.storage)
        adjacency[n_sources:, :n_sources] = rows.gather(logit_rows, columns)
        return adjacency


def partial_influences(
    rows: RowStore,
    n_rows: int,
    row_features: Int[Tensor, " n_rows"],
    logit_probabilities: Float[Tensor, " n_logits"],
) -> Float[Tensor, " n_columns"]:
    """Each column's influence on the logits through the first `n_rows` rows: the sum
    over path lengths of the logit probabilities propagated back through the
    row-normalised absolute edges (circuit-tracer's `compute_partial_influences`).

    Only rows carry influence on, so the propagation runs on the rows' own columns
    and one final product spreads it to every column. The rows are read twice, one
    block at a time, so that no copy of the whole matrix is made."""
    device = rows.device
    is_feature = (row_features >= 0).to(device)
    row_columns = row_features.clamp(min=0).to(device)
    weights, inner = [], []
    for block in rows.blocks(n_rows):
        weights.append(block.abs().sum(dim=1))
        inner.append(block[:, row_columns].abs())
    weight = torch.cat(weights).clamp(min=1e-8)
    # inner[i, j]: normalised |edge| from the feature of row j into the target of row i.
    inner = torch.cat(inner) / weight[:, None]
    inner[:, ~is_feature] = 0
    n_logits = logit_probabilities.shape[0]
    current = torch.zeros(n_rows, device=device, dtype=rows.dtype)
    current[:n_logits] = logit_probabilities.to(device=device, dtype=rows.dtype)
    total = current.clone()
    for _ in range(n_rows + 1):
        current = current @ inner
        if not current.any():
            break
        total += current
    influence = torch.zeros(rows.n_columns, device=device, dtype=rows.dtype)
    scaled = (total / weight).split(rows.block_rows)
    for block, scale in zip(rows.blocks(n_rows), scaled):
        influence += scale @ block.abs()
    return influence


_CHUNK = 256
