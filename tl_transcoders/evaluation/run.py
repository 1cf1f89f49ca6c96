"""`evaluate_splice`: what splicing transcoders in does to the model's loss.

For a set of transcoders and a token set the report gives the clean CE, the CE and KL
with all transcoders spliced at once, and for each layer: CE with that transcoder alone,
with the MLP output zero- and mean-ablated, CE recovered, KL, FVU, L0 and the fraction
of dead latents, each CE and KL figure with its standard error over rows (`report.py`).

Memory. The token set (one tensor of any number of rows, or any iterable of batches, a
generator or a streamed dataset; `hooks.tokens`) is read once, in batches of at most
`batch_size` rows; by default as many rows as keep one float32 copy of a batch's
logits within `LOGITS_BUDGET_BYTES`. Only per-row figures are kept across batches, so
peak memory is that of one batch whatever the number of rows. Mean ablation needs the
mean over all rows, so its variants run in a second sweep after the first; that sweep
re-runs the clean pass (up to the last ablated block, where the backend allows) of every
batch but the last, whose state is still at hand. The token ids of the set are kept for
it (8 bytes a token).

Cost. One clean forward pass per batch caches what every variant starts from
(`clean_pass.py`): each single-layer variant then runs only the later blocks and the
unembedding.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from tl_transcoders.core.activations import SparseLatents
from tl_transcoders.core.config import default_output_site
from tl_transcoders.core.placement import AnyTranscoder, Placement, describe, placements
from tl_transcoders.core.transcoder import Transcoder
from tl_transcoders.evaluation.baselines import AblationBaselines, TokenFingerprint
from tl_transcoders.evaluation.clean_pass import CleanPass, EvaluationError, head_input
from tl_transcoders.evaluation.report import LayerReport, SpliceReport
from tl_transcoders.evaluation.statistics import RunningFVU, difference_estimate, mean_estimate, ratio_estimate
from tl_transcoders.hooks.sites import is_bridge
from tl_transcoders.hooks.splice import (
    check_compatible,
    check_not_spliced,
    eval_mode,
    placements_of,
    transcoder_list,
)
from tl_transcoders.hooks.tokens import TokenInput, token_batches_of

__all__ = [
    "LOGITS_BUDGET_BYTES",
    "EvaluationError",
    "compute_ablation_baselines",
    "default_batch_size",
    "evaluate_splice",
]

LOGITS_BUDGET_BYTES = 256 * 2**20
"""The default batch holds as many rows as fit one float32 copy of their logits in this
many bytes (a few copies are alive at once)."""


def default_batch_size(model: nn.Module, n_pos: int) -> int:
    """Rows per batch for rows of `n_pos` tokens: one float32 copy of their logits within
    `LOGITS_BUDGET_BYTES`, at least 1."""
    return max(1, LOGITS_BUDGET_BYTES // (n_pos * model.cfg.d_vocab * 4))


def evaluate_splice(
    model: nn.Module,
    transcoders: AnyTranscoder | Sequence[AnyTranscoder],
    tokens: TokenInput,
    baselines: AblationBaselines | None = None,
    *,
    batch_size: int | None = None,
    keep_per_token: bool = False,
) -> SpliceReport:
    """Measure the spliced model on `tokens` (see the module docstring for what is read
    and kept). CE follows TransformerLens's `return_type="loss"`: the mean next-token
    loss over all predicted positions; KL is KL(clean || spliced) of the next-token
    distributions, averaged over all positions. FVU, L0 and dead fraction are measured on
    the transcoder's input and output sites in the clean run.

    Args:
        model: a `HookedTransformer` or `TransformerBridge`.
        transcoders: one transcoder or several, per-layer or cross-layer, at most one
            per layer.
        tokens: token ids, `[n_rows, pos]` or an iterable of `[batch, pos]` batches, all
            rows of one length (at least 2).
        baselines: from `compute_ablation_baselines` on the same tokens, to skip the
            zero- and mean-ablation passes.
        batch_size: rows per forward pass (default: `default_batch_size`).
        keep_per_token: also keep every per-token CE and KL in the report (memory grows
            with the number of tokens)."""
    transcoders = transcoder_list(transcoders)
    if not transcoders:
        raise EvaluationError("evaluate_splice needs at least one transcoder")
    layers = [p.layer for p in placements_of(transcoders)]
    if len(set(layers)) != len(layers):
        raise EvaluationError(f"evaluate_splice takes at most one transcoder per layer, got layers {layers}")
    check_compatible(model, transcoders)
    check_not_spliced(model, "evaluate_splice")
    sites = [p.output_site for p in placements_of(transcoders)]
    if baselines is not None and not isinstance(baselines, AblationBaselines):
        raise EvaluationError(
            f"baselines must come from compute_ablation_baselines (or be None), got {type(baselines).__name__}"
        )
    if baselines is not None:
        baselines.check_sites(sites)
    batches = token_batches_of(model, tokens, _rows_per_batch(model, batch_size))
    with eval_mode(transcoders):
        sweep = _sweep(model, batches, transcoders, [] if baselines else sites, keep_per_token)
    if baselines is None:
        baselines = sweep.baselines
    else:
        baselines.check_matches(sweep.fingerprint, sweep.baselines.per_row_clean)
    return _report(sweep, transcoders, baselines)


def compute_ablation_baselines(
    model: nn.Module, tokens: TokenInput, sites: str | int | Sequence[str | int], *, batch_size: int | None = None
) -> AblationBaselines:
    """Zero- and mean-ablation CE for each output site (a hook name, or a layer number
    for that layer's `hook_mlp_out`) on `tokens`, to reuse across `evaluate_splice`
    calls on the same tokens (e.g. every checkpoint of a training run)."""
    if isinstance(sites, (str, int)):
        sites = [sites]
    n_layers = model.cfg.n_layers
    bad = [s for s in sites if isinstance(s, int) and not 0 <= s < n_layers]
    if bad:
        raise EvaluationError(f"layer {bad[0]} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    sites = [default_output_site(s) if isinstance(s, int) else s for s in sites]
    check_not_spliced(model, "compute_ablation_baselines")
    batches = token_batches_of(model, tokens, _rows_per_batch(model, batch_size))
    return _sweep(model, batches, [], sites, keep_per_token=False).baselines


def _rows_per_batch(model: nn.Module, batch_size: int | None) -> int | Callable[[int], int]:
    return batch_size if batch_size is not None else (lambda n_pos: default_batch_size(model, n_pos))


# --- the sweep over batches ----------------------------------------------------------


class _Rows:
    """Each named per-token quantity's row means (and, if kept, its per-token values),
    gathered over batches."""

    def __init__(self, keep_per_token: bool):
        self.keep_per_token = keep_per_token
        self.means: dict[str, list[Tensor]] = defaultdict(list)
        self.tokens: dict[str, list[Tensor]] = defaultdict(list)

    def add(self, name: str, values: Tensor) -> None:
        self.means[name].append(values.double().mean(dim=-1))
        if self.keep_per_token:
            self.tokens[name].append(values)

    def row_means(self) -> dict[str, Tensor]:
        return {name: torch.cat(values) for name, values in self.means.items()}

    def per_token(self) -> dict[str, Tensor]:
        return {name: torch.cat(values) for name, values in self.tokens.items()}


class _LayerStats:
    """Running FVU, L0 and fired-latent tracking of one replaced layer over batches
    (device tensors, read once at the end)."""

    def __init__(self, place: Placement):
        device = place.module.W_enc.device
        self.running_fvu = RunningFVU()
        self.active = torch.zeros((), dtype=torch.float64, device=device)
        self.fired = torch.zeros(place.module.cfg.d_latent, dtype=torch.bool, device=device)
        self.n = 0

    def update(self, output: Tensor, target: Tensor, latents: SparseLatents) -> None:
        self.running_fvu.update(target.reshape(-1, target.shape[-1]), output.reshape(-1, output.shape[-1]))
        active = latents.values != 0
        self.active += active.sum()
        self.fired[latents.indices[active]] = True
        self.n += active.shape[:-1].numel()

    def fvu(self) -> float:
        return self.running_fvu.value()

    def l0(self) -> float:
        return self.active.item() / self.n

    def dead_fraction(self) -> float:
        return 1.0 - self.fired.float().mean().item()


def clean_reconstructions(
    transcoder: AnyTranscoder, cache: dict[str, Tensor]
) -> Iterator[tuple[Placement, Tensor, SparseLatents]]:
    """For each layer `transcoder` replaces: its placement, its reconstruction of the
    output site from the clean activations in `cache` (in the site's dtype) and the
    latents it was decoded from (a cross-layer transcoder's layer l reads the clean
    inputs of its layers up to l)."""
    dtype = transcoder.W_enc.dtype
    every = placements(transcoder)
    if isinstance(transcoder, Transcoder):
        out, latents = transcoder.forward_with_latents(cache[every[0].input_site].to(dtype))
        results = [(out, latents)]
    else:
        run = transcoder.run(torch.stack([cache[p.input_site].to(dtype) for p in every]))
        results = list(zip(run.outputs, run.latents))
    for place, (out, latents) in zip(every, results):
        if not torch.isfinite(out).all():
            raise EvaluationError(
                f"{describe(transcoder)} produced NaN or inf outputs for layer {place.layer} on the clean "
                "activations; check its weights and dtype"
            )
        yield place, out.to(cache[place.output_site].dtype), latents


T = TypeVar("T")


def _with_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Each item with a flag that is True for the last one (one item read ahead)."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


@dataclass
class _Sweep:
    """What one sweep over a token set measured."""

    rows: _Rows
    stats: dict[int, _LayerStats]
    baselines: AblationBaselines
    fingerprint: TokenFingerprint
    n_predicted: int


def _sweep(
    model: nn.Module,
    batches: Iterable[Tensor],
    transcoders: list[AnyTranscoder],
    ablation_sites: list[str],
    keep_per_token: bool,
) -> _Sweep:
    """Read every batch once: clean pass, zero ablations, all-spliced and per-layer
    variants; then the mean-ablation sweep (see the module docstring)."""
    rows = _Rows(keep_per_token)
    every = placements_of(transcoders)
    stats = {p.layer: _LayerStats(p) for p in every}
    sites = sorted({s for p in every for s in (p.input_site, p.output_site)} | set(ablation_sites))
    fingerprint = TokenFingerprint()
    site_sums: dict[str, Tensor] = {}
    kept: list[Tensor] = []
    last: CleanPass | None = None
    resumable, n_positions = True, 0
    with torch.no_grad():
        for index, (batch, is_last) in enumerate(_with_last(batches)):
            fingerprint.update(batch)
            clean = CleanPass(model, batch, sites, transcoders, resumable, verify=index == 0 and is_bridge(model))
            resumable = clean.resumable
            n_positions += batch.numel()
            _measure_batch(clean, rows, stats, site_sums, ablation_sites)
            if ablation_sites:
                kept.append(batch)
            last = clean if is_last else None
            del clean  # before the next batch's pass: one batch's logits at a time
        means = {site: (total / n_positions).to(last.cache[site].dtype) for site, total in site_sums.items()}
        for i, batch in enumerate(kept):
            state = last if i == len(kept) - 1 else CleanPass(model, batch, ablation_sites, [], resumable, logits=False)
            for site in ablation_sites:
                logits = state.variant_logits(site, means[site].expand_as(state.cache[site]))
                rows.add(f"{site}.mean_ablated", state.ce_of(logits))
            del state, logits
    row_means = rows.row_means()
    baselines = AblationBaselines(
        fingerprint=fingerprint.hexdigest(),
        per_row_clean=row_means["clean"],
        per_row={
            site: (row_means[f"{site}.zero_ablated"], row_means[f"{site}.mean_ablated"]) for site in ablation_sites
        },
        means=means,
    )
    return _Sweep(rows, stats, baselines, fingerprint, n_positions - fingerprint.n_rows)


def _measure_batch(
    clean: CleanPass,
    rows: _Rows,
    stats: dict[int, _LayerStats],
    site_sums: dict[str, Tensor],
    ablation_sites: list[str],
) -> None:
    """Every variant of the first sweep on one batch's clean pass."""
    rows.add("clean", clean.ce)
    for site in ablation_sites:
        value = clean.cache[site]
        site_sums[site] = site_sums.get(site, 0) + value.double().sum(dim=(0, 1))
        rows.add(f"{site}.zero_ablated", clean.ce_of(clean.variant_logits(site, torch.zeros_like(value))))
    if clean.transcoders:
        with head_input(clean.model) as head:
            logits = clean.all_spliced_logits()
        _add_ce_and_kl(rows, "all_spliced", *clean.ce_and_kl_of(logits, head.get("x")))
    for transcoder in clean.transcoders:
        for place, out, latents in clean_reconstructions(transcoder, clean.cache):
            stats[place.layer].update(out, clean.cache[place.output_site], latents)
            with head_input(clean.model) as head:
                logits = clean.variant_logits(place.output_site, out)
            _add_ce_and_kl(rows, f"layer{place.layer}.spliced", *clean.ce_and_kl_of(logits, head.get("x")))


def _add_ce_and_kl(rows: _Rows, name: str, ce: Tensor, kl: Tensor) -> None:
    rows.add(name, ce)
    rows.add(f"kl.{name}", kl)


def _report(sweep: _Sweep, transcoders: list[AnyTranscoder], baselines: AblationBaselines) -> SpliceReport:
    """The report from a sweep's rows and the (computed or reused) baselines."""
    per_row = sweep.rows.row_means()
    per_token = sweep.rows.per_token()
    clean = per_row["clean"]
    layers = {}
    for place in placements_of(transcoders):
        layer, site = place.layer, place.output_site
        zero, mean = baselines.per_row[site]
        per_row[f"layer{layer}.zero_ablated"], per_row[f"layer{layer}.mean_ablated"] = zero, mean
        for variant in ("zero_ablated", "mean_ablated"):
            if f"{site}.{variant}" in per_token:  # computed in this sweep, not reused
                per_token[f"layer{layer}.{variant}"] = per_token[f"{site}.{variant}"]
        spliced = per_row[f"layer{layer}.spliced"]
        stats = sweep.stats[layer]
        layers[layer] = LayerReport(
            ce_spliced=mean_estimate(spliced),
            ce_zero_ablated=mean_estimate(zero),
            ce_mean_ablated=mean_estimate(mean),
            ce_recovered=ratio_estimate(zero.double() - spliced.double(), zero.double() - clean.double()),
            ce_increase=difference_estimate(spliced, clean),
            kl=mean_estimate(per_row[f"kl.layer{layer}.spliced"]),
            fvu=stats.fvu(),
            l0=stats.l0(),
            dead_fraction=stats.dead_fraction(),
        )
    for name in [n for n in per_row if n.startswith("blocks.")]:
        del per_row[name]
    kl_per_token = {name.removeprefix("kl."): v for name, v in per_token.items() if name.startswith("kl.")}
    per_token = {name: v for name, v in per_token.items() if not name.startswith(("kl.", "blocks."))}
    return SpliceReport(
        ce_clean=mean_estimate(clean),
        ce_all_spliced=mean_estimate(per_row["all_spliced"]),
        ce_increase_all_spliced=difference_estimate(per_row["all_spliced"], clean),
        kl_all_spliced=mean_estimate(per_row["kl.all_spliced"]),
        n_tokens=sweep.n_predicted,
        n_rows=int(clean.numel()),
        layers=layers,
        per_row=per_row,
        per_token=per_token,
        kl_per_token=kl_per_token,
    )
