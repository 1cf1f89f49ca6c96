"""Feature dashboards: what makes a transcoder (or SAE) latent fire and what it writes.

`collect_activations` streams token batches through the model, stopped after the
transcoder's block (`sites.capture`), encodes the input site and keeps, for every latent
(or a chosen subset): its `n_top` largest activations with the token window around each
and that latent's activation on every token of the window, its firing count and a
histogram of its activations. Memory is O(n_latents * n_top * window), independent of
the number of tokens; every update is a batched sort / scatter, never a loop over
tokens. `top_latents` picks live latents by frequency or peak activation.
`latent_dashboard` / `latent_dashboards` add the weights-based views (top logit effects
and top de-embedding tokens) and give one latent as data (`to_dict`) or HTML (`to_html`,
shown by notebooks); `dashboard_page` and `save_dashboards` put several on one page.

Definitions:
- A latent *fires* on a token where its activation is > 0 (every activation function
  gives non-negative values, except JumpReLU with a negative threshold, whose negative
  values are not counted).
- Position 0 of every row (the BOS token) is left out by default (`skip_bos`): it is
  not counted, not ranked and shows activation 0 inside windows.
- Ties between equal activations go to the earlier token (batch order, then row, then
  position), so the records do not depend on how the tokens are split into batches.
- Histogram: `n_bins` linear bins over [0, 2^e) per latent, where e is the smallest
  integer with every activation seen so far below 2^e. When a batch raises e by d, each
  run of 2^d neighbouring bins merges into one bin of the coarser grid (whose edges are
  edges of the finer grid), so the counts are exact, decided without a second pass, and
  the same for any split of the tokens into batches.
- Random non-activating contexts are not recorded.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_transcoders.analysis.errors import AnalysisError, check_finite_activations
from tl_transcoders.attribution.virtual_weights import (
    AttributionError,
    embedding_weights,
    logit_weights,
)
from tl_transcoders.core.errors import check_at_least
from tl_transcoders.core.files import atomic_write, read_mapping
from tl_transcoders.core.transcoder import Transcoder
from tl_transcoders.hooks.sites import capture
from tl_transcoders.hooks.splice import check_compatible, describe
from tl_transcoders.hooks.tokens import TokenInput, token_batches_of

__all__ = [
    "Context",
    "ENCODE_CHUNK",
    "LatentDashboard",
    "LatentRecords",
    "TokenEffect",
    "check_encodable",
    "check_latents",
    "collect_activations",
    "dashboard_page",
    "latent_dashboard",
    "latent_dashboards",
    "latents_across_frequencies",
    "load_dashboards",
    "save_dashboards",
    "token_strings",
    "transcoder_inputs",
    "top_latents",
    "visible",
]

ENCODE_CHUNK = 4096
"""Tokens encoded at once: bounds the dense `[tokens, d_latent]` intermediate."""


@dataclass
class LatentRecords:
    """What `collect_activations` saw, per recorded latent (row i is latent `latents[i]`).

    Top activations are sorted in decreasing order; a latent that fired on fewer than
    `n_top` tokens has its remaining entries padded with value 0, row and position -1.
    `window_tokens[i, j]` holds the token ids of positions `position - window_before ..
    position + window_after` of that row (-1 outside the sequence) and
    `window_activations[i, j]` latent `latents[i]`'s activation on each of them, so the
    top token is at window index `window_before`. Rows are numbered across all batches.
    The histogram of latent i has `n_bins` equal bins over [0, 2^hist_exponents[i])."""

    latents: Int[Tensor, " n_latents"]
    top_values: Float[Tensor, "n_latents n_top"]
    top_rows: Int[Tensor, "n_latents n_top"]
    top_positions: Int[Tensor, "n_latents n_top"]
    window_tokens: Int[Tensor, "n_latents n_top window"]
    window_activations: Float[Tensor, "n_latents n_top window"]
    fire_counts: Int[Tensor, " n_latents"]
    hist_counts: Int[Tensor, "n_latents n_bins"]
    hist_exponents: Int[Tensor, " n_latents"]
    n_tokens: int
    window_before: int
    window_after: int
    d_latent: int
    layer: int
    transcoder: str  # `splice.describe` of the transcoder, to match it later

    def slot(self, latent: int) -> int:
        """The row of `latent` in these records; a clear error if it was not recorded."""
        if not 0 <= latent < self.d_latent:
            raise _out_of_range(latent, self.d_latent)
        hits = (self.latents == latent).nonzero()
        if hits.numel() == 0:
            raise AnalysisError(
                f"latent {latent} was not recorded (these records hold {self.latents.numel()} chosen "
                "latents); pass it in `latents=` to collect_activations"
            )
        return int(hits[0, 0])

    def histogram(self, latent: int) -> tuple[list[float], list[int]]:
        """Bin edges and counts of `latent`'s activations, without trailing empty bins."""
        slot = self.slot(latent)
        counts = self.hist_counts[slot]
        nonzero = counts.nonzero()
        n = int(nonzero[-1, 0]) + 1 if nonzero.numel() else 0
        width = 2.0 ** int(self.hist_exponents[slot]) / counts.numel()
        return [i * width for i in range(n + 1)] if n else [], counts[:n].tolist()


def collect_activations(
    model: nn.Module,
    transcoder: Transcoder,
    batches: TokenInput,
    n_top: int = 20,
    latents: Int[Tensor, " n"] | Sequence[int] | None = None,
    n_bins: int = 64,
    window_before: int = 24,
    window_after: int = 4,
    skip_bos: bool = True,
    batch_size: int = 32,
) -> LatentRecords:
    """Stream token `batches` (a `[n_rows, pos]` tensor, or any iterable of `[batch,
    pos]` batches, one `pos` for all; see `hooks.tokens`) through `model` and record,
    for every latent of `transcoder` (or those in `latents`), its `n_top` strongest
    activations with their windows, its firing count and its histogram (see the module
    docstring for the definitions). The tokens are read once, `batch_size` rows at a
    time, each batch checked as it comes; memory does not grow with the number of rows."""
    check_at_least(AnalysisError, 1, n_top=n_top, n_bins=n_bins, batch_size=batch_size)
    check_at_least(AnalysisError, 0, window_before=window_before, window_after=window_after)
    check_encodable(model, transcoder)
    collector = _Collector(
        transcoder, check_latents(transcoder, latents), n_top, n_bins, window_before, window_after, int(skip_bos)
    )
    with torch.no_grad():
        for batch in token_batches_of(model, batches, batch_size, min_positions=1):
            collector.add(batch, transcoder_inputs(model, batch, transcoder))
    return collector.records()


def transcoder_inputs(
    model: nn.Module, batch: Int[Tensor, "batch pos"], transcoder: Transcoder
) -> Float[Tensor, "batch_x_pos d_in"]:
    """The activations `transcoder` reads (its input site) on `batch`, one row per token
    (row-major over batch and position), in its dtype; `AnalysisError` where they hold
    NaN or inf."""
    site = transcoder.cfg.input_site
    x = capture(model, batch, [site])[site]
    check_finite_activations(x, site)
    return x.to(transcoder.W_enc.dtype)


def check_encodable(model: nn.Module, transcoder: Transcoder) -> None:
    """Refuse what cannot encode `model`'s tokens one at a time: not a `Transcoder`, a
    BatchTopK transcoder in training mode (it selects across the batch), or one made for
    another model (`check_compatible`)."""
    if not isinstance(transcoder, Transcoder):
        raise AnalysisError(f"expected a Transcoder, got {type(transcoder).__name__}")
    if transcoder.cfg.activation == "batchtopk" and transcoder.training:
        raise AnalysisError(
            "a BatchTopK transcoder in training mode selects latents across the whole batch; "
            "call transcoder.eval() to encode each token on its own (with its threshold)"
        )
    check_compatible(model, [transcoder])


def check_latents(transcoder: Transcoder, latents: Tensor | Sequence[int] | None) -> Int[Tensor, " n_chosen"]:
    """`latents` as a tensor of indices on the transcoder's device (every latent for
    None); an `AnalysisError` (a `ValueError`) for an empty, non-integer, repeated or out-of-range index."""
    d_latent = transcoder.cfg.d_latent
    device = transcoder.W_enc.device
    if latents is None:
        return torch.arange(d_latent, device=device)
    chosen = torch.as_tensor(latents, device=device).reshape(-1)
    if chosen.numel() == 0 or chosen.is_floating_point():
        raise AnalysisError("latents must be a non-empty sequence of integer latent indices")
    bad = chosen[(chosen < 0) | (chosen >= d_latent)]
    if bad.numel():
        raise _out_of_range(int(bad[0]), d_latent)
    if chosen.unique().numel() != chosen.numel():
        raise AnalysisError("latents must not repeat")
    return chosen.long()


def _out_of_range(latent: int, d_latent: int) -> AnalysisError:
    return AnalysisError(f"latent {latent} is out of range: the transcoder has {d_latent} latents (0..{d_latent - 1})")


class _Collector:
    """The running records of `collect_activations` (all tensors on the transcoder's
    device; `n` recorded latents, called slots here)."""

    def __init__(
        self, transcoder: Transcoder, latents: Tensor, n_top: int, n_bins: int, before: int, after: int, skip: int
    ):
        self.transcoder, self.latents, self.skip = transcoder, latents, skip
        self.before, self.after = before, after
        device, n, d_latent = latents.device, latents.numel(), transcoder.cfg.d_latent
        window = before + after + 1
        self.slot_of = torch.full((d_latent,), -1, dtype=torch.long, device=device)
        self.slot_of[latents] = torch.arange(n, device=device)
        self.values = torch.zeros(n, n_top, device=device)
        self.rows = torch.full((n, n_top), -1, dtype=torch.long, device=device)
        self.positions = torch.full((n, n_top), -1, dtype=torch.long, device=device)
        self.window_tokens = torch.full((n, n_top, window), -1, dtype=torch.int32, device=device)
        self.window_acts = torch.zeros(n, n_top, window, device=device)
        self.fire_counts = torch.zeros(n, dtype=torch.long, device=device)
        self.hist = torch.zeros(n, n_bins, dtype=torch.long, device=device)
        self.exponents = torch.full((n,), -(2**20), dtype=torch.long, device=device)  # no values yet
        self.n_tokens = 0
        self.n_rows = 0

    def add(self, batch: Tensor, x: Tensor) -> None:
        """Update with one batch of tokens `[B, P]` and its input activations `[B * P, d_in]`."""
        n_pos = batch.shape[1]
        token, slot, value = self._entries(x, n_pos)
        keys, order = (token * self.latents.numel() + slot).sort()
        self.fire_counts += torch.bincount(slot, minlength=self.latents.numel())
        self._update_histogram(slot, value)
        self._update_top(batch, token, slot, value, keys, value[order])
        self.n_tokens += batch.shape[0] * max(n_pos - self.skip, 0)
        self.n_rows += batch.shape[0]

    def _entries(self, x: Tensor, n_pos: int) -> tuple[Tensor, Tensor, Tensor]:
        """(flat token index, slot, activation) of every positive activation of a
        recorded latent, outside the skipped positions, in token order."""
        tokens, slots, values = [], [], []
        for start in range(0, x.shape[0], ENCODE_CHUNK):
            chunk = x[start : start + ENCODE_CHUNK]
            if self.transcoder.cfg.activation == "topk":
                sparse = self.transcoder.encode_sparse(chunk)
                v, latent = sparse.values.float(), sparse.indices
                t = torch.arange(chunk.shape[0], device=x.device)[:, None].expand_as(latent)
                s = self.slot_of[latent]
                keep = (v > 0) & (s >= 0)
                t, s, v = t[keep], s[keep], v[keep]
            else:
                dense = self.transcoder.encode(chunk)
                if self.latents.numel() != self.transcoder.cfg.d_latent:
                    dense = dense[:, self.latents]
                t, s = (dense > 0).nonzero(as_tuple=True)
                v = dense[t, s].float()
            tokens.append(t + start)
            slots.append(s)
            values.append(v)
        token, slot, value = torch.cat(tokens), torch.cat(slots), torch.cat(values)
        keep = token % n_pos >= self.skip
        return token[keep], slot[keep], value[keep]

    def _update_histogram(self, slot: Tensor, value: Tensor) -> None:
        n, n_bins = self.hist.shape
        batch_max = torch.zeros(n, device=value.device).scatter_reduce(0, slot, value, "amax")
        exponent = torch.frexp(batch_max).exponent.long()  # batch_max < 2^exponent
        new = torch.where(batch_max > 0, torch.maximum(self.exponents, exponent), self.exponents)
        shift = (new - self.exponents).clamp(max=62)
        if (shift > 0).any():
            merged = torch.arange(n_bins, device=value.device)[None] >> shift[:, None]
            self.hist = torch.zeros_like(self.hist).scatter_add_(1, merged, self.hist)
        self.exponents = new
        scaled = torch.ldexp(value.double(), -self.exponents[slot].double())
        bins = (scaled * n_bins).long().clamp_(0, n_bins - 1)
        self.hist += torch.bincount(slot * n_bins + bins, minlength=n * n_bins).view(n, n_bins)

    def _update_top(
        self, batch: Tensor, token: Tensor, slot: Tensor, value: Tensor, keys: Tensor, key_values: Tensor
    ) -> None:
        """Merge the batch's activations into the running top lists of the slots they
        can enter: one stable sort by decreasing value, then by slot, over those slots'
        old lists followed by the batch's candidates (in token order)."""
        n_top = self.values.shape[1]
        better = value > self.values[slot, -1]
        token, slot, value = token[better], slot[better], value[better]
        if token.numel() == 0:
            return
        touched, local = slot.unique(return_inverse=True)
        m = touched.numel()
        all_slot = torch.cat([torch.arange(m, device=slot.device).repeat_interleave(n_top), local])
        all_value = torch.cat([self.values[touched].reshape(-1), value])
        order = torch.sort(-all_value, stable=True).indices
        order = order[torch.sort(all_slot[order], stable=True).indices]
        sorted_slot = all_slot[order]
        counts = torch.bincount(sorted_slot, minlength=m)
        rank = torch.arange(order.numel(), device=order.device) - (counts.cumsum(0) - counts)[sorted_slot]
        order = order[rank < n_top]  # each slot has n_top old entries, so n_top are kept
        is_new = order >= m * n_top
        old = order.clamp(max=m * n_top - 1)
        fresh = order[is_new] - m * n_top
        new_token = token[fresh]
        n_pos = batch.shape[1]
        tokens, acts = self._windows(batch, new_token, slot[fresh], keys, key_values)

        def merge(state: Tensor, new: Tensor) -> None:
            out = state[touched].reshape(m * n_top, *state.shape[2:])[old]
            out[is_new] = new.to(out.dtype)
            state[touched] = out.view(m, *state.shape[1:])

        self.values[touched] = all_value[order].view(m, n_top)
        merge(self.rows, new_token // n_pos + self.n_rows)
        merge(self.positions, new_token % n_pos)
        merge(self.window_tokens, tokens)
        merge(self.window_acts, acts)

    def _windows(
        self, batch: Tensor, token: Tensor, slot: Tensor, keys: Tensor, key_values: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Token ids and activations of `slot` around each flat token index `token`,
        looked up in the batch's sorted (token * n + slot) `keys`."""
        n_pos = batch.shape[1]
        row, position = token // n_pos, token % n_pos
        offsets = torch.arange(-self.before, self.after + 1, device=token.device)
        where = position[:, None] + offsets
        inside = (where >= 0) & (where < n_pos)
        where = where.clamp(0, n_pos - 1)
        tokens = torch.where(inside, batch[row[:, None], where], -1)
        wanted = (row[:, None] * n_pos + where) * self.latents.numel() + slot[:, None]
        index = torch.searchsorted(keys, wanted).clamp_(max=keys.numel() - 1)
        found = inside & (keys[index] == wanted)
        return tokens, torch.where(found, key_values[index], 0.0)

    def records(self) -> LatentRecords:
        cfg = self.transcoder.cfg
        return LatentRecords(
            latents=self.latents.cpu(),
            top_values=self.values.cpu(),
            top_rows=self.rows.cpu(),
            top_positions=self.positions.cpu(),
            window_tokens=self.window_tokens.cpu(),
            window_activations=self.window_acts.cpu(),
            fire_counts=self.fire_counts.cpu(),
            hist_counts=self.hist.cpu(),
            hist_exponents=self.exponents.cpu(),
            n_tokens=self.n_tokens,
            window_before=self.before,
            window_after=self.after,
            d_latent=cfg.d_latent,
            layer=cfg.layer,
            transcoder=describe(self.transcoder),
        )


def top_latents(records: LatentRecords, by: str = "frequency", n: int = 10) -> list[int]:
    """Up to `n` recorded latents that fired at least once, the most frequent first
    (`by="frequency"`) or the most strongly activating first (`by="max_activation"`)."""
    if by == "frequency":
        score = records.fire_counts.double()
    elif by == "max_activation":
        score = records.top_values[:, 0].double()
    else:
        raise AnalysisError(f"by must be 'frequency' or 'max_activation', got {by!r}")
    alive = (records.fire_counts > 0).nonzero()[:, 0]
    order = alive[torch.sort(-score[alive], stable=True).indices]
    return records.latents[order[:n]].tolist()


def latents_across_frequencies(
    records: LatentRecords,
    n: int = 10,
    band: tuple[float, float] = (1e-4, 1e-2),
    n_densest: int = 2,
    seed: int = 0,
) -> tuple[list[int], list[int]]:
    """Latents worth looking at, for dashboards: `n` drawn at random (with `seed`) among
    those firing on a fraction of tokens within `band` (the most interpretable range:
    dense latents rarely mean one thing), and separately the `n_densest` most frequent
    ones, to be shown as such. Returns `(spread, densest)`, each ordered from rare to
    frequent; `spread` is topped up with the latents nearest the band (in log
    frequency) when the band holds fewer than `n`, and never repeats a latent of
    `densest`. Latents that never fired are left out."""
    check_at_least(AnalysisError, 0, n=n, n_densest=n_densest, seed=seed)
    low, high = band
    if not 0 < low <= high <= 1:
        raise AnalysisError(f"band must be two firing fractions 0 < low <= high <= 1, got {band}")
    frequency = records.fire_counts.double() / max(records.n_tokens, 1)
    alive = (records.fire_counts > 0).nonzero()[:, 0]
    densest = alive[frequency[alive].argsort(descending=True, stable=True)[:n_densest]]
    candidates = alive[~torch.isin(alive, densest)]
    log_frequency = frequency[candidates].log()
    # Distance in log frequency outside the band; 0 inside it, with a random tie-break.
    distance = (log_frequency - math.log(high)).clamp(min=0) + (math.log(low) - log_frequency).clamp(min=0)
    shuffle = torch.rand(candidates.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    order = shuffle.argsort()
    order = order[distance[order].argsort(stable=True)]
    spread = candidates[order[:n]]

    def by_frequency(slots: Tensor) -> list[int]:
        return records.latents[slots[frequency[slots].argsort(stable=True)]].tolist()

    return by_frequency(spread), by_frequency(densest)


# --- one latent's dashboard ---------------------------------------------------------


@dataclass
class Context:
    """One top-activating context: the window's tokens (as strings and ids), the
    latent's activation on each, and where the top token is."""

    tokens: list[str]
    token_ids: list[int]
    activations: list[float]
    top_index: int  # index of the ranked token in `tokens`
    row: int
    position: int
    value: float


@dataclass
class TokenEffect:
    """A token and a weight (a logit effect or a de-embedding weight)."""

    token: str
    token_id: int
    value: float


@dataclass
class LatentDashboard:
    """Everything shown for one latent. `logit_effects` ("positive" and "negative") and
    `de_embedding` are empty when no model was given or the transcoder's sites are not
    ones the weights-based views support (`notes` says why)."""

    latent: int
    layer: int
    transcoder: str
    contexts: list[Context]
    histogram_edges: list[float]
    histogram_counts: list[int]
    fire_count: int
    n_tokens: int
    frequency: float
    max_activation: float
    logit_effects: dict[str, list[TokenEffect]]
    de_embedding: list[TokenEffect]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatentDashboard:
        """The dashboard `to_dict` wrote; `AnalysisError` naming what is missing or
        malformed."""
        try:
            effects = {sign: [TokenEffect(**e) for e in rows] for sign, rows in data["logit_effects"].items()}
            return cls(
                **{
                    **data,
                    "contexts": [Context(**c) for c in data["contexts"]],
                    "logit_effects": effects,
                    "de_embedding": [TokenEffect(**e) for e in data["de_embedding"]],
                }
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise AnalysisError(f"not a dashboard written by LatentDashboard.to_dict: {err!r}") from None

    def to_html(self) -> str:
        """A self-contained HTML fragment (inline CSS and SVG, no scripts)."""
        return f'<div class="tlt-dash-root"><style>{_CSS}</style>{self._body()}</div>'

    def _repr_html_(self) -> str:
        return self.to_html()

    @property
    def anchor(self) -> str:
        return f"layer{self.layer}-latent{self.latent}"

    def _body(self) -> str:
        stats = (
            f"fires on {self.fire_count} of {self.n_tokens} tokens "
            f"(frequency {self.frequency:.3g}), max activation {self.max_activation:.4g}"
        )
        parts = [
            f'<div class="tlt-dash" id="{self.anchor}">',
            f"<h2>Latent {self.latent}</h2>",
            f'<p class="tlt-meta">{html.escape(self.transcoder)}<br>{stats}</p>',
            *(f'<p class="tlt-note">{html.escape(note)}</p>' for note in self.notes),
            '<div class="tlt-row">',
            _histogram_svg(self.histogram_edges, self.histogram_counts),
            _effects_table("Promoted logits", self.logit_effects.get("positive", [])),
            _effects_table("Suppressed logits", self.logit_effects.get("negative", [])),
            _effects_table("Top de-embedding tokens", self.de_embedding),
            "</div>",
            f"<h3>Top activations ({len(self.contexts)})</h3>",
            *(self._context_html(c) for c in self.contexts),
            "</div>",
        ]
        return "".join(parts)

    def _context_html(self, context: Context) -> str:
        spans = []
        scale = self.max_activation if self.max_activation > 0 else 1.0
        tokens = zip(context.tokens, context.token_ids, context.activations)
        for i, (text, token_id, act) in enumerate(tokens):
            alpha = min(max(act / scale, 0.0), 1.0)
            css = "tok top" if i == context.top_index else "tok"
            title = html.escape(f"token {token_id}: activation {act!r}")
            spans.append(
                f'<span class="{css}" style="background: rgba(255, 102, 0, {alpha:.3f})" '
                f'title="{title}">{html.escape(visible(text))}</span>'
            )
        label = f"{context.value:.4g} (row {context.row}, position {context.position})"
        return f'<div class="tlt-ctx"><span class="tlt-val">{label}</span>{"".join(spans)}</div>'


def visible(text: str) -> str:
    """A token string with its whitespace made visible: newline, tab and carriage return
    as glyphs, and the spaces of an all-space token as "␣"."""
    text = text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    return text.replace(" ", "␣") if text.strip(" ") == "" else text


def latent_dashboard(
    records: LatentRecords,
    latent: int,
    model: nn.Module | None = None,
    transcoder: Transcoder | None = None,
    tokenizer: Any = None,
    k_tokens: int = 10,
) -> LatentDashboard:
    """The dashboard of `latent` from `records` (see `latent_dashboards`)."""
    return latent_dashboards(records, [latent], model, transcoder, tokenizer, k_tokens)[0]


def latent_dashboards(
    records: LatentRecords,
    latents: Sequence[int],
    model: nn.Module | None = None,
    transcoder: Transcoder | None = None,
    tokenizer: Any = None,
    k_tokens: int = 10,
) -> list[LatentDashboard]:
    """The dashboards of `latents` from `records`, with the weights computed once for
    all. With `model` and `transcoder` (the one the records were collected with) they
    show the top `k_tokens` logit effects and de-embedding tokens. Tokens are shown with
    `tokenizer` (default `model.tokenizer`; anything with `decode` or
    `convert_ids_to_tokens`), or as ids without one.

    Logit effects are `logit_weights`: the latent's decoder row, as written into the
    residual stream (through a post-MLP norm for `mlp.hook_out`), dotted with the
    unembedding through the final norm's weight (and centring for LayerNorm), the norm's
    input-dependent scale treated as 1. De-embedding weights are `embedding_weights`:
    each token embedding dotted with the direction the latent's encoder reads."""
    if (model is None) != (transcoder is None):
        raise AnalysisError("pass both model and transcoder for the logit and de-embedding views, or neither")
    check_at_least(AnalysisError, 1, k_tokens=k_tokens)
    latents = [int(latent) for latent in latents]
    slots = [records.slot(latent) for latent in latents]
    if tokenizer is None and model is not None:
        tokenizer = getattr(model, "tokenizer", None)
    logits = de_embed = None
    notes = []
    if model is not None:
        if transcoder.cfg.d_latent != records.d_latent or describe(transcoder) != records.transcoder:
            raise AnalysisError(
                f"these records were collected with the {records.transcoder} "
                f"({records.d_latent} latents), not with the {describe(transcoder)}"
            )
        check_compatible(model, [transcoder])
        try:
            logits = logit_weights(model, transcoder, latents)
            de_embed = embedding_weights(model, transcoder, latents).T
        except AttributionError as err:  # sites the weights-based views do not cover
            notes.append(f"no logit or de-embedding view: {err}")
    dashboards = []
    for i, (latent, slot) in enumerate(zip(latents, slots)):
        effects, de_embedding = {}, []
        if logits is not None:
            effects = {
                "positive": _top_effects(logits[i], k_tokens, tokenizer),
                "negative": _top_effects(-logits[i], k_tokens, tokenizer, sign=-1.0),
            }
            de_embedding = _top_effects(de_embed[i], k_tokens, tokenizer)
        fire_count = int(records.fire_counts[slot])
        edges, counts = records.histogram(latent)
        dashboards.append(
            LatentDashboard(
                latent=latent,
                layer=records.layer,
                transcoder=records.transcoder,
                contexts=_contexts(records, slot, tokenizer),
                histogram_edges=edges,
                histogram_counts=counts,
                fire_count=fire_count,
                n_tokens=records.n_tokens,
                frequency=fire_count / records.n_tokens,
                max_activation=float(records.top_values[slot, 0]),
                logit_effects=effects,
                de_embedding=de_embedding,
                notes=list(notes),
            )
        )
    return dashboards


def _contexts(records: LatentRecords, slot: int, tokenizer: Any) -> list[Context]:
    contexts = []
    for j in range(min(int(records.fire_counts[slot]), records.top_values.shape[1])):
        ids = records.window_tokens[slot, j]
        inside = ids >= 0
        token_ids = ids[inside].tolist()
        contexts.append(
            Context(
                tokens=token_strings(tokenizer, token_ids),
                token_ids=token_ids,
                activations=records.window_activations[slot, j][inside].tolist(),
                top_index=int(inside[: records.window_before].sum()),
                row=int(records.top_rows[slot, j]),
                position=int(records.top_positions[slot, j]),
                value=float(records.top_values[slot, j]),
            )
        )
    return contexts


def _top_effects(scores: Tensor, k: int, tokenizer: Any, sign: float = 1.0) -> list[TokenEffect]:
    values, ids = scores.detach().float().cpu().topk(min(k, scores.numel()))
    ids = ids.tolist()
    names = token_strings(tokenizer, ids)
    return [TokenEffect(name, i, sign * v) for name, i, v in zip(names, ids, values.tolist())]


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token id as text: decoded one by one where the tokenizer can (so spaces and
    bytes read as text), else its vocabulary entry; the id itself without a tokenizer."""
    if tokenizer is None:
        return [str(i) for i in ids]
    if hasattr(tokenizer, "decode"):
        return [tokenizer.decode([i]) for i in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]


# --- HTML ---------------------------------------------------------------------------

_CSS = """
.tlt-dash { font-family: system-ui, sans-serif; font-size: 13px; margin: 0 0 28px 0; }
.tlt-dash h2 { font-size: 17px; margin: 4px 0; }
.tlt-dash h3 { font-size: 14px; margin: 10px 0 4px 0; }
.tlt-meta, .tlt-note { color: #555; margin: 2px 0 8px 0; }
.tlt-row { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.tlt-table { border-collapse: collapse; }
.tlt-table caption { font-weight: 600; text-align: left; }
.tlt-table td { padding: 1px 6px; font-family: ui-monospace, monospace; white-space: pre; }
.tlt-table td.num { text-align: right; }
.tlt-ctx { font-family: ui-monospace, monospace; white-space: pre; overflow-x: auto; margin: 2px 0; }
.tlt-val { display: inline-block; min-width: 210px; color: #555; }
.tlt-ctx .tok { border-right: 1px solid #eee; }
.tlt-ctx .tok.top { outline: 2px solid #c0392b; font-weight: 700; }
.tlt-index { columns: 3; }
"""


def _effects_table(caption: str, effects: list[TokenEffect]) -> str:
    if not effects:
        return ""
    rows = "".join(
        f'<tr><td title="token {e.token_id}">{html.escape(visible(e.token))}</td>'
        f'<td class="num">{e.value:+.4g}</td></tr>'
        for e in effects
    )
    return f'<table class="tlt-table"><caption>{html.escape(caption)}</caption>{rows}</table>'


def _histogram_svg(edges: list[float], counts: list[int], width: int = 320, height: int = 110) -> str:
    """Bars of `counts` over `edges`, with the range and peak count as labels."""
    if not counts:
        return '<svg class="tlt-hist" width="320" height="20"><text x="0" y="14">never fired</text></svg>'
    plot = height - 30
    bar = width / len(counts)
    peak = max(counts)
    rects = []
    for i, count in enumerate(counts):
        h = plot * count / peak
        rects.append(
            f'<rect x="{i * bar:.2f}" y="{14 + plot - h:.2f}" width="{max(bar - 1, 0.5):.2f}" '
            f'height="{h:.2f}" fill="#e67e22"><title>[{edges[i]:.4g}, {edges[i + 1]:.4g}): '
            f"{count}</title></rect>"
        )
    return (
        f'<svg class="tlt-hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        f'<text x="0" y="10" font-size="11">activation histogram (peak {peak})</text>'
        + "".join(rects)
        + f'<text x="0" y="{height - 2}" font-size="11">0</text>'
        f'<text x="{width}" y="{height - 2}" font-size="11" text-anchor="end">{edges[-1]:.4g}</text>'
        "</svg>"
    )


def dashboard_page(dashboards: Sequence[LatentDashboard], title: str = "Latent dashboards") -> str:
    """One self-contained HTML page with an index and every dashboard."""
    index = "".join(
        f'<li><a href="#{d.anchor}">layer {d.layer} latent {d.latent}</a> '
        f"(frequency {d.frequency:.3g}, max {d.max_activation:.4g})</li>"
        for d in dashboards
    )
    body = "".join(d._body() for d in dashboards)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f'<body><h1>{html.escape(title)}</h1><ul class="tlt-index">{index}</ul>{body}</body></html>'
    )


def save_dashboards(
    path: str | os.PathLike, dashboards: Sequence[LatentDashboard], title: str = "Latent dashboards"
) -> Path:
    """Write `dashboard_page(dashboards, title)` to `path` (renamed into place, so an
    interrupted write never leaves a partial file); a `.json` path gets the data."""
    path = Path(path)
    if path.suffix == ".json":
        text = json.dumps({"title": title, "dashboards": [d.to_dict() for d in dashboards]}, indent=1)
    else:
        text = dashboard_page(dashboards, title)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def load_dashboards(path: str | os.PathLike) -> list[LatentDashboard]:
    """The dashboards `save_dashboards` wrote to a `.json` path; `AnalysisError` for a
    missing, unreadable or foreign file."""
    try:
        data = read_mapping(path, AnalysisError)
    except AnalysisError as err:
        raise AnalysisError(f"cannot read dashboards ({err}); write them with save_dashboards(.json)") from None
    if not isinstance(data.get("dashboards"), list):
        raise AnalysisError(f"{path}: not a dashboards file written by save_dashboards (no 'dashboards' list)")
    return [LatentDashboard.from_dict(d) for d in data["dashboards"]]
