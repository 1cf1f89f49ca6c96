"""What splicing transcoders in does to a model: spliced CE, KL, FVU, L0 and dead
latents per layer and for all layers together, with ablation baselines."""

from tl_transcoders.evaluation.run import (
    AblationBaselines,
    LayerReport,
    SpliceReport,
    check_token_batches,
    compute_ablation_baselines,
    evaluate_splice,
)

__all__ = [
    "AblationBaselines",
    "LayerReport",
    "SpliceReport",
    "check_token_batches",
    "compute_ablation_baselines",
    "evaluate_splice",
]
