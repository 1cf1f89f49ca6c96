"""Ablation baselines: the CE of the model with an MLP output zeroed or set to its mean.

They do not depend on the transcoders, so `compute_ablation_baselines` computes them once
for a token set and every `evaluate_splice(..., baselines=...)` on the same tokens
(every checkpoint of a training run, say) reuses them. A `TokenFingerprint` identifies
the token set row by row, whatever its split into batches, so baselines are never
reused with other tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_transcoders.core.errors import TranscodersError

__all__ = ["AblationBaselines", "BaselineError", "TokenFingerprint"]


class BaselineError(TranscodersError, ValueError):
    """Ablation baselines that do not belong to the tokens or sites they are used with."""


class TokenFingerprint:
    """A running digest of token rows, independent of how the rows are batched."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self.n_rows = 0

    def update(self, batch: Int[Tensor, "batch pos"]) -> None:
        rows = batch.detach().cpu().numpy().astype(np.int64)
        for row in rows:
            self._digest.update(len(row).to_bytes(8, "little"))
            self._digest.update(row.tobytes())
        self.n_rows += rows.shape[0]

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


@dataclass
class AblationBaselines:
    """Zero- and mean-ablation CE for a set of output sites on one token set.

    `per_row[site]` holds each row's mean `(zero_ablated, mean_ablated)` CE, `[n_rows]`
    each, and `per_row_clean` the clean model's; `means[site]` is the site's mean
    activation over the token set (what mean ablation writes). `fingerprint` identifies
    the token set (`TokenFingerprint`)."""

    fingerprint: str
    per_row_clean: Float[Tensor, " n_rows"] = field(repr=False)
    per_row: dict[str, tuple[Tensor, Tensor]] = field(repr=False)
    means: dict[str, Tensor] = field(repr=False)

    @property
    def ce_clean(self) -> float:
        """Mean clean CE over the token set."""
        return self.per_row_clean.double().mean().item()

    def ce(self, site: str) -> tuple[float, float]:
        """Mean (zero-ablated, mean-ablated) CE for `site`."""
        zero, mean = self.per_row[site]
        return zero.double().mean().item(), mean.double().mean().item()

    def check_sites(self, sites: list[str]) -> None:
        """Raise `BaselineError` unless every site has baselines here."""
        missing = [site for site in sites if site not in self.per_row]
        if missing:
            raise BaselineError(
                f"the ablation baselines do not cover site(s) {missing} (they cover {sorted(self.per_row)}); "
                "compute them with compute_ablation_baselines for every output site you evaluate"
            )

    def check_matches(self, fingerprint: TokenFingerprint, per_row_clean: Float[Tensor, " n_rows"]) -> None:
        """Raise `BaselineError` unless `fingerprint` is of the token set these baselines
        were computed on and the clean CE of each row (`per_row_clean`, as measured now)
        is theirs up to round-off: baselines of another model, or of other weights, would
        give wrong CE recovered."""
        if fingerprint.hexdigest() != self.fingerprint:
            raise BaselineError(
                "these ablation baselines were computed on other tokens; compute them with "
                "compute_ablation_baselines on the same token set you evaluate"
            )
        ours, now = self.per_row_clean.double().cpu(), per_row_clean.double().cpu()
        if not torch.allclose(ours, now, rtol=1e-3, atol=1e-4):
            worst = float((ours - now).abs().max())
            raise BaselineError(
                f"these ablation baselines were computed with another model or other weights (the clean CE of a "
                f"row differs by up to {worst:.3g}); compute them with compute_ablation_baselines on this model"
            )
