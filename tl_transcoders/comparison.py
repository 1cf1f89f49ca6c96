"""The seed paper's comparison: an SAE, a transcoder and a skip transcoder per layer,
trained from one forward pass on the same tokens with equal width and k, and measured
the same way on held-out text.

    variants = train_variants(model, layers=[3, 9], batches=..., k=32, expansion=16, tokens=2_000_000)
    rows = compare_variants(model, variants, heldout_tokens)
    print(markdown_table(rows))

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

from tl_transcoders.evaluation import compute_ablation_baselines, evaluate_splice
from tl_transcoders.sites import capture
from tl_transcoders.training import TrainConfig, Trainer, fit_together
from tl_transcoders.transcoder import Transcoder

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
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    clashing = {"sae", "skip", "layers", "output_dir"} & set(options)
    if clashing:
        raise ValueError(f"{sorted(clashing)} are set per variant; do not pass them")
    trainers = [
        Trainer(model, TrainConfig(layers=list(layers), output_dir=str(Path(output_dir) / v), **VARIANTS[v], **options))
        for v in variants
    ]
    return dict(zip(variants, fit_together(trainers, batches)))


def latent_frequencies(
    model: nn.Module, transcoder: Transcoder, tokens: Int[Tensor, "batch pos"], batch_size: int = 8
) -> Float[Tensor, " d_latent"]:
    """The fraction of tokens (position 0 excluded: BOS) on which each latent fires."""
    counts = torch.zeros(transcoder.cfg.d_latent, dtype=torch.float64)
    n = 0
    for batch in tokens.split(batch_size):
        x = capture(model, batch, [transcoder.cfg.input_site])[transcoder.cfg.input_site]
        x = x.reshape(batch.shape[0], batch.shape[1], -1)[:, 1:].reshape(-1, x.shape[-1])
        with torch.no_grad():
            counts += (transcoder.encode(x.to(transcoder.W_enc.dtype)) > 0).sum(0).double()
        n += x.shape[0]
    return (counts / max(n, 1)).float()


def compare_variants(
    model: nn.Module, variants: dict[str, list[Transcoder]], tokens: Int[Tensor, "batch pos"]
) -> list[dict]:
    """One row per (variant, layer) measured on `tokens`: FVU, CE clean / spliced /
    zero-ablated, KL, CE recovered, L0, dead and dense fractions. Each dictionary is
    spliced alone; the ablation baselines are computed once for all."""
    layers = sorted({t.cfg.layer for ts in variants.values() for t in ts})
    baselines = compute_ablation_baselines(model, tokens, layers)
    rows = []
    for name, transcoders in variants.items():
        for transcoder in transcoders:
            report = evaluate_splice(model, [transcoder], tokens, baselines=baselines)
            layer = report.layers[transcoder.cfg.layer]
            frequency = latent_frequencies(model, transcoder, tokens)
            rows.append({
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
            })
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    """The comparison rows as a Markdown table (frequencies left out)."""
    columns = ["variant", "layer", "fvu", "ce_clean", "ce_spliced", "kl", "ce_recovered", "l0",
               "dead_fraction", "dense_fraction"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in sorted(rows, key=lambda r: (r["layer"], list(VARIANTS).index(r["variant"]))):
        cells = [f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_comparison(rows: Sequence[dict]):
    """A plotly figure: FVU and CE recovered by layer for each variant, and each
    variant's histogram of log10 latent frequency (needs the `[plot]` extra)."""
    try:
        from plotly.subplots import make_subplots
        import plotly.graph_objects as go
    except ImportError as error:
        raise ImportError("plot_comparison needs plotly: pip install 'tl-transcoders[plot]'") from error
    figure = make_subplots(rows=1, cols=3, subplot_titles=("FVU (lower is better)", "CE recovered",
                                                            "latent frequency (log10, held-out tokens)"))
    for name in VARIANTS:
        mine = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["layer"])
        if not mine:
            continue
        layers = [r["layer"] for r in mine]
        figure.add_trace(go.Scatter(x=layers, y=[r["fvu"] for r in mine], name=name, legendgroup=name), 1, 1)
        figure.add_trace(go.Scatter(x=layers, y=[r["ce_recovered"] for r in mine], name=name,
                                    legendgroup=name, showlegend=False), 1, 2)
        frequencies = torch.tensor([f for r in mine for f in r["frequencies"]])
        alive = frequencies[frequencies > 0].log10()
        figure.add_trace(go.Histogram(x=alive.tolist(), name=name, legendgroup=name, showlegend=False,
                                      opacity=0.6, nbinsx=50), 1, 3)
    figure.update_layout(barmode="overlay", height=420, width=1300)
    figure.update_xaxes(title_text="layer", row=1, col=1)
    figure.update_xaxes(title_text="layer", row=1, col=2)
    return figure


def rows_without_frequencies(rows: Sequence[dict]) -> list[dict]:
    """The rows without their per-latent frequency lists (for compact JSON)."""
    return [{k: v for k, v in r.items() if k != "frequencies"} for r in rows]
