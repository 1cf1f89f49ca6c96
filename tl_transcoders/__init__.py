"""tl-transcoders: transcoders and skip transcoders for TransformerLens."""

from tl_transcoders.activations import SparseLatents
from tl_transcoders.config import ConfigError, TranscoderConfig
from tl_transcoders.evaluation import (
    AblationBaselines,
    LayerReport,
    SpliceReport,
    compute_ablation_baselines,
    evaluate_splice,
)
from tl_transcoders.interop import export_circuit_tracer, load_pretrained
from tl_transcoders.models import load_model
from tl_transcoders.sites import SiteError
from tl_transcoders.splice import SpliceError, check_compatible, splice
from tl_transcoders.transcoder import Transcoder, TranscoderFileError

__all__ = [
    "AblationBaselines",
    "LayerReport",
    "SpliceReport",
    "compute_ablation_baselines",
    "evaluate_splice",
    "ConfigError",
    "SiteError",
    "SparseLatents",
    "SpliceError",
    "Transcoder",
    "TranscoderConfig",
    "TranscoderFileError",
    "check_compatible",
    "export_circuit_tracer",
    "load_model",
    "load_pretrained",
    "splice",
]
