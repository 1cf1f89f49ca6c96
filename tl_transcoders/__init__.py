"""tl-transcoders: transcoders and skip transcoders for TransformerLens.

The names here are the everyday API; each lives in one layer of the package, and the
layers depend only downward (docs/concepts.md has the module map):

    core        config, activations, sparse kernels, the Transcoder, the cross-layer
                transcoder and their own file format
    io          other libraries' formats, loading by name or from the Hub, corpora
    hooks       hook sites, splice, loading models, token input checks
    evaluation  spliced CE / KL / FVU reports with error bars
    training    the trainer
    attribution virtual weights, paths, attribution graphs, interventions
    analysis    dashboards, probing, autointerp, SAE / transcoder comparisons
    app         the command line and the demo
"""

from tl_transcoders import _compat
from tl_transcoders.core.activations import SparseLatents
from tl_transcoders.core.clt import CrossLayerTranscoder
from tl_transcoders.core.config import ConfigError, CrossLayerConfig, TranscoderConfig
from tl_transcoders.core.native import TranscoderFileError
from tl_transcoders.core.transcoder import Transcoder
from tl_transcoders.evaluation import (
    AblationBaselines,
    LayerReport,
    SpliceReport,
    compute_ablation_baselines,
    evaluate_splice,
    format_table,
)
from tl_transcoders.hooks.models import load_model
from tl_transcoders.hooks.sites import SiteError, cross_layer_config, transcoder_config
from tl_transcoders.hooks.splice import SpliceError, check_compatible, splice
from tl_transcoders.io.loading import export_circuit_tracer, load_pretrained

__all__ = [
    "AblationBaselines",
    "ConfigError",
    "CrossLayerConfig",
    "CrossLayerTranscoder",
    "LayerReport",
    "SiteError",
    "SparseLatents",
    "SpliceError",
    "SpliceReport",
    "Transcoder",
    "TranscoderConfig",
    "TranscoderFileError",
    "check_compatible",
    "compute_ablation_baselines",
    "cross_layer_config",
    "evaluate_splice",
    "export_circuit_tracer",
    "format_table",
    "load_model",
    "load_pretrained",
    "splice",
    "transcoder_config",
]

_compat.install()
_compat.attach_deprecated_methods()


def __getattr__(name: str):
    """Old submodule names (`tl_transcoders.sites`, ...) keep resolving, with a warning."""
    return _compat.old_attribute(name)
