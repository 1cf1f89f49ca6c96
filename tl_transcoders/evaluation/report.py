"""The result of `evaluate_splice`: `SpliceReport`, one `LayerReport` per transcoder.

CE is next-token cross-entropy in nats per predicted token, KL is KL(clean || spliced)
of the next-token distributions per position. Every CE and KL figure, and CE recovered,
is an `Estimate`: a float with its standard error over rows (`report.ce_clean.se`);
`ce_increase` is spliced minus clean CE with the paired standard error, the figure that
says whether a splice costs anything at all. `to_dict` writes each as `name` and
`name_se`; `format_table` prints the report for people.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor

from tl_transcoders.evaluation.statistics import Estimate

__all__ = ["LayerReport", "SpliceReport", "format_table"]


def _scalars(report: Any) -> dict[str, Any]:
    """The report's float fields, each `Estimate` also as `<name>_se`."""
    out: dict[str, Any] = {}
    for f in fields(report):
        value = getattr(report, f.name)
        if isinstance(value, (float, int)) and not isinstance(value, bool):
            out[f.name] = float(value) if isinstance(value, float) else value
            if isinstance(value, Estimate):
                out[f"{f.name}_se"] = value.se
    return out


@dataclass
class LayerReport:
    """Splice-in numbers for one layer's transcoder (see the module docstring); CE in
    nats per predicted token."""

    ce_spliced: Estimate
    """CE with this transcoder alone in place of its layer's MLP output."""
    ce_zero_ablated: Estimate
    """CE with the layer's MLP output set to zero."""
    ce_mean_ablated: Estimate
    """CE with the layer's MLP output replaced by its mean over the evaluation tokens."""
    ce_recovered: Estimate
    """(CE zero-ablated - CE spliced) / (CE zero-ablated - CE clean): 1 when splicing
    costs nothing, 0 when it is as bad as removing the MLP output; above 1 only by noise
    or when the transcoder beats the MLP it replaces."""
    ce_increase: Estimate
    """CE spliced minus CE clean, with the paired standard error."""
    kl: Estimate
    """KL(clean || spliced) of the next-token distributions, per position."""
    fvu: float
    """Fraction of the MLP output's variance the transcoder leaves unexplained, on the
    clean run's activations."""
    l0: float
    """Active latents per token, on the clean run's activations."""
    dead_fraction: float
    """Fraction of latents that never fired on the clean run's activations."""

    def to_dict(self) -> dict[str, float]:
        """Scalars, JSON-ready; every estimate also as `<name>_se`."""
        return _scalars(self)


@dataclass
class SpliceReport:
    """The result of `evaluate_splice` (see the module docstring).

    `per_row` holds each row's mean CE `[n_rows]` for "clean", "all_spliced" and
    "layer{L}.spliced|zero_ablated|mean_ablated", and each row's mean KL under
    "kl.all_spliced" and "kl.layer{L}.spliced". With `evaluate_splice(...,
    keep_per_token=True)`, `per_token` holds the per-token CE `[n_rows, pos-1]` and
    `kl_per_token` the per-token KL `[n_rows, pos]` under the same names (without the
    "kl." prefix); both are empty otherwise."""

    ce_clean: Estimate
    ce_all_spliced: Estimate
    ce_increase_all_spliced: Estimate
    kl_all_spliced: Estimate
    n_tokens: int
    n_rows: int
    layers: dict[int, LayerReport]
    per_row: dict[str, Tensor] = field(repr=False)
    per_token: dict[str, Tensor] = field(default_factory=dict, repr=False)
    kl_per_token: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Scalars only, JSON-ready (layer keys become strings); every estimate also as
        `<name>_se`."""
        out = _scalars(self)
        out["layers"] = {str(layer): r.to_dict() for layer, r in sorted(self.layers.items())}
        return out


def _pm(value: Estimate, digits: int) -> str:
    se = "" if math.isnan(value.se) else f"±{value.se:.{digits}f}"
    return f"{float(value):.{digits}f}{se}"


def format_table(report: SpliceReport) -> str:
    """The report as a fixed-width text table, each estimate as `value±se`."""
    lines = [
        f"clean CE {_pm(report.ce_clean, 4)} | all spliced CE {_pm(report.ce_all_spliced, 4)} "
        f"(+{_pm(report.ce_increase_all_spliced, 4)}), KL {_pm(report.kl_all_spliced, 4)} | "
        f"{report.n_tokens} predicted tokens in {report.n_rows} rows",
        f"{'layer':>5} {'CE spliced':>15} {'CE increase':>15} {'CE zero':>8} {'CE mean':>8} "
        f"{'CE recovered':>13} {'KL':>15} {'FVU':>6} {'L0':>6} {'dead':>5}",
    ]
    for layer, r in sorted(report.layers.items()):
        lines.append(
            f"{layer:>5} {_pm(r.ce_spliced, 4):>15} {_pm(r.ce_increase, 4):>15} {float(r.ce_zero_ablated):>8.4f} "
            f"{float(r.ce_mean_ablated):>8.4f} {_pm(r.ce_recovered, 3):>13} {_pm(r.kl, 4):>15} "
            f"{r.fvu:>6.3f} {r.l0:>6.1f} {r.dead_fraction:>5.2f}"
        )
    lines.append("± one standard error over rows; CE in nats per predicted token")
    return "\n".join(lines)
