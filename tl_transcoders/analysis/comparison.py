"""The seed paper's comparison: an SAE, a transcoder and a skip transcoder per layer,
trained from one forward pass on the same tokens with equal width and k, and measured
the same way on held-out text.

    variants = train_variants(model, layers=[3, 9], batches=..., k=32, expansion=16, tokens=2_000_000)
    rows = compare_variants(model, variants, heldout_tokens)
    print(markdown_table(rows))

(`examples/seed_evidence.py` turns the rows, probing and autointerp results into the
evidence for each of the paper's claims.)

The SAE reconstructs the MLP output (`hook_mlp_out` -> `hook_mlp_out`); the transcoders
map the MLP input to the MLP output. All three are spliced at the same place, the MLP
output, so their CE, KL and CE recovered are directly comparable; FVU is each one's own
target (the MLP output for all three).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_transcoders.analysis.dashboards import transcoder_inputs
from tl_transcoders.analysis.errors import AnalysisError
from tl_transcoders.core.transcoder import Transcoder
from tl_transcoders.evaluation import compute_ablation_baselines, evaluate_splice
from tl_transcoders.hooks.tokens import TokenInput, check_tokens, token_batches_of
from tl_transcoders.training import TrainConfig, Trainer, fit_together

__all__ = [
    "DENSE",
    "VARIANTS",
    "compare_variants",
    "density_histogram",
    "density_table",
    "latent_frequencies",
    "markdown_table",
    "plot_comparison",
    "rows_without_frequencies",
    "train_variants",
]

VARIANTS: dict[str, dict] = {
    "sae": dict(sae=True, skip=False),
    "transcoder": dict(skip=False),
    "skip_transcoder": dict(skip=True),
}
"""The three dictionaries of the comparison, as `TrainConfig` options."""

DENSE = 0.1
"""A latent firing on more than this fraction of tokens counts as dense."""


def train_variants(
    model: nn.Module,
    layers: Sequence[int],
    batches: Iterable[Int[Tensor, "batch context"]],
    output_dir: str | Path,
    variants: Sequence[str] = tuple(VARIANTS),
    **options,
) -> dict[str, list[Transcoder]]:
    """Train every variant for every layer from one forward pass per batch.

    `options` are `TrainConfig` fields shared by all (k, expansion, max_tokens,
    batch_size, context_size, activation, seed...); each variant writes to
    `output_dir/{variant}/layer_{L}`. Returns {variant: transcoders by layer}."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise AnalysisError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    clashing = {"sae", "skip", "layers", "output_dir"} & set(options)
    if clashing:
        raise AnalysisError(f"{sorted(clashing)} are set per variant; do not pass them")
    trainers = [
        Trainer(model, TrainConfig(layers=list(layers), output_dir=str(Path(output_dir) / v), **VARIANTS[v], **options))
        for v in variants
    ]
    return dict(zip(variants, fit_together(trainers, batches)))


def latent_frequencies(
    model: nn.Module, transcoder: Transcoder, tokens: TokenInput, batch_size: int = 8
) -> Float[Tensor, " d_latent"]:
    """The fraction of tokens (position 0 excluded: BOS) on which each latent fires;
    `tokens` is read once, `batch_size` rows at a time."""
    counts = torch.zeros(transcoder.cfg.d_latent, dtype=torch.float64, device=transcoder.W_enc.device)
    n = 0
    for batch in token_batches_of(model, tokens, batch_size):
        x = transcoder_inputs(model, batch, transcoder)
        x = x.reshape(batch.shape[0], batch.shape[1], -1)[:, 1:].reshape(-1, x.shape[-1])
        with torch.no_grad():
            counts += (transcoder.encode(x) > 0).sum(0).double()
        n += x.shape[0]
    return (counts / max(n, 1)).float()


def compare_variants(
    model: nn.Module, variants: dict[str, list[Transcoder]], tokens: Int[Tensor, "batch pos"], batch_size: int = 8
) -> list[dict]:
    """One row per (variant, layer) measured on `tokens`, `batch_size` rows at a time:
    FVU, CE clean / spliced / zero-ablated, KL, CE recovered, L0, dead and dense
    fractions. Each dictionary is spliced alone, each a pass over the tokens (so they are
    a tensor, not a stream); the ablation baselines are computed once for all."""
    layers = sorted({t.cfg.layer for ts in variants.values() for t in ts})
    batches = check_tokens(model, tokens, where="held-out tokens", min_positions=2).split(batch_size)
    baselines = compute_ablation_baselines(model, batches, layers)
    rows = []
    for name, transcoders in variants.items():
        for transcoder in transcoders:
            report = evaluate_splice(model, [transcoder], batches, baselines=baselines)
            layer = report.layers[transcoder.cfg.layer]
            frequency = latent_frequencies(model, transcoder, tokens, batch_size)
            rows.append(
                {
                    "variant": name,
                    "layer": transcoder.cfg.layer,
                    "d_latent": transcoder.cfg.d_latent,
                    "k": transcoder.cfg.k,
                    "fvu": layer.fvu,
                    "ce_clean": report.ce_clean,
                    "ce_spliced": layer.ce_spliced,
                    "ce_zero_ablated": layer.ce_zero_ablated,
                    "kl": layer.kl,
                    "ce_recovered": layer.ce_recovered,
                    "l0": layer.l0,
                    "dead_fraction": (frequency == 0).float().mean().item(),
                    "dense_fraction": (frequency > DENSE).float().mean().item(),
                    "frequencies": frequency.tolist(),
                }
            )
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    """The comparison rows as a Markdown table (frequencies left out)."""
    columns = [
        "variant",
        "layer",
        "fvu",
        "ce_clean",
        "ce_spliced",
        "kl",
        "ce_recovered",
        "l0",
        "dead_fraction",
        "dense_fraction",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in sorted(rows, key=lambda r: (r["layer"], list(VARIANTS).index(r["variant"]))):
        cells = [f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def density_histogram(rows: Sequence[dict], bins_per_decade: int = 4, lowest: int = -6) -> dict:
    """Latent counts by firing frequency for each row (variant and layer), from the
    rows' `frequencies`: log10 frequency binned from `lowest` to 0 with
    `bins_per_decade` bins per decade (a frequency below 10**lowest goes in the first
    bin, exactly 1 in the last), dead latents counted apart.

    Returns `{"edges": [log10 bin edges], "rows": [{"variant", "layer", "dead",
    "counts": [per bin]}]}`."""
    n_bins = -lowest * bins_per_decade
    edges = [lowest + i / bins_per_decade for i in range(n_bins + 1)]
    out = []
    for row in rows:
        frequency = torch.tensor(row["frequencies"], dtype=torch.float64)
        alive = frequency[frequency > 0].log10()
        index = ((alive - lowest) * bins_per_decade).floor().long().clamp(0, n_bins - 1)
        counts = torch.bincount(index, minlength=n_bins)
        out.append(
            {
                "variant": row["variant"],
                "layer": row["layer"],
                "dead": int((frequency == 0).sum()),
                "counts": counts.tolist(),
            }
        )
    return {"edges": edges, "rows": out}


def density_table(rows: Sequence[dict]) -> str:
    """Markdown: the fraction of each dictionary's latents per decade of firing
    frequency on the held-out tokens, and dead."""
    histogram = density_histogram(rows, bins_per_decade=1, lowest=-5)
    edges = histogram["edges"]
    labels = [f"< 1e{edges[1]:.0f}"] + [f"1e{a:.0f} to 1e{b:.0f}" for a, b in zip(edges[1:-2], edges[2:-1])]
    labels.append(f">= 1e{edges[-2]:.0f}")
    lines = ["| variant | layer | dead | " + " | ".join(labels) + " |", "|---|---|---|" + "---|" * len(labels)]
    order = sorted(histogram["rows"], key=lambda r: (r["layer"], list(VARIANTS).index(r["variant"])))
    for row in order:
        total = row["dead"] + sum(row["counts"])
        cells = [row["dead"]] + row["counts"]
        lines.append(f"| {row['variant']} | {row['layer']} | " + " | ".join(f"{c / total:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def plot_comparison(rows: Sequence[dict]):
    """A plotly figure: FVU and CE recovered by layer for each variant, and each
    variant's histogram of log10 latent frequency over all its layers (binned here, so
    the figure stays small; needs the `[plot]` extra)."""
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError as error:
        raise ImportError("plot_comparison needs plotly: pip install 'tl-transcoders[plot]'") from error
    figure = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=("FVU (lower is better)", "CE recovered", "latents by log10 firing frequency (held-out)"),
    )
    histogram = density_histogram(rows)
    edges = histogram["edges"]
    centres = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    for name in VARIANTS:
        mine = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["layer"])
        if not mine:
            continue
        layers = [r["layer"] for r in mine]
        figure.add_trace(go.Scatter(x=layers, y=[r["fvu"] for r in mine], name=name, legendgroup=name), 1, 1)
        figure.add_trace(
            go.Scatter(x=layers, y=[r["ce_recovered"] for r in mine], name=name, legendgroup=name, showlegend=False),
            1,
            2,
        )
        counts = [sum(c) for c in zip(*(r["counts"] for r in histogram["rows"] if r["variant"] == name))]
        figure.add_trace(
            go.Bar(
                x=centres,
                y=counts,
                name=name,
                legendgroup=name,
                showlegend=False,
                opacity=0.6,
                width=edges[1] - edges[0],
            ),
            1,
            3,
        )
    figure.update_layout(barmode="overlay", height=420, width=1300)
    figure.update_xaxes(title_text="layer", row=1, col=1)
    figure.update_xaxes(title_text="layer", row=1, col=2)
    figure.update_xaxes(title_text="log10 fraction of tokens", row=1, col=3)
    return figure


def rows_without_frequencies(rows: Sequence[dict]) -> list[dict]:
    """The rows without their per-latent frequency lists (for compact JSON)."""
    return [{k: v for k, v in r.items() if k != "frequencies"} for r in rows]
