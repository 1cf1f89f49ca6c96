"""What splicing transcoders in does to a model: spliced CE, KL, FVU, L0 and dead
latents per layer and for all layers together, with error bars and ablation baselines.

`run.py` streams the token set (`evaluate_splice`, `compute_ablation_baselines`);
`clean_pass.py` is one batch's clean pass and the variants run from it; `report.py` the
result types and their table; `baselines.py` the reusable ablation baselines;
`statistics.py` the standard errors and FVU.
"""

from tl_transcoders.evaluation.baselines import AblationBaselines, BaselineError
from tl_transcoders.evaluation.report import LayerReport, SpliceReport, format_table
from tl_transcoders.evaluation.run import (
    EvaluationError,
    compute_ablation_baselines,
    default_batch_size,
    evaluate_splice,
)
from tl_transcoders.evaluation.statistics import Estimate

__all__ = [
    "AblationBaselines",
    "BaselineError",
    "Estimate",
    "EvaluationError",
    "LayerReport",
    "SpliceReport",
    "compute_ablation_baselines",
    "default_batch_size",
    "evaluate_splice",
    "format_table",
]
