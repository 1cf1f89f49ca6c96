"""Old import paths and methods, kept working for one release with a `DeprecationWarning`.

The package was laid out in layers (`core`, `io`, `hooks`, `evaluation`, `training`,
`attribution`, `analysis`, `app`; see docs/concepts.md). A module imported by its old
path (`tl_transcoders.transcoder`, `tl_transcoders.sites`, ...) is the module at its
new path, the same object, so classes and monkeypatches stay identical; the import
warns once. Two methods that needed a higher layer left their classes:
`TranscoderConfig.for_model` is now `tl_transcoders.transcoder_config` and
`Transcoder.from_pretrained` is `tl_transcoders.load_pretrained`; the old names still
work and warn.

This module is the package's only composition point for old names: it is imported by
`tl_transcoders/__init__.py` and nothing else imports it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

MOVED_MODULES = {
    "tl_transcoders.config": "tl_transcoders.core.config",
    "tl_transcoders.activations": "tl_transcoders.core.activations",
    "tl_transcoders.transcoder": "tl_transcoders.core.transcoder",
    "tl_transcoders.files": "tl_transcoders.core.files",
    "tl_transcoders.training.sparse": "tl_transcoders.core.kernels",
    "tl_transcoders.formats": "tl_transcoders.io.formats",
    "tl_transcoders.interop": "tl_transcoders.io.loading",
    "tl_transcoders.data": "tl_transcoders.io.data",
    "tl_transcoders.sites": "tl_transcoders.hooks.sites",
    "tl_transcoders.splice": "tl_transcoders.hooks.splice",
    "tl_transcoders.models": "tl_transcoders.hooks.models",
    "tl_transcoders.statistics": "tl_transcoders.evaluation.statistics",
    "tl_transcoders.dashboards": "tl_transcoders.analysis.dashboards",
    "tl_transcoders.probing": "tl_transcoders.analysis.probing",
    "tl_transcoders.autointerp": "tl_transcoders.analysis.autointerp",
    "tl_transcoders.comparison": "tl_transcoders.analysis.comparison",
    "tl_transcoders.cli": "tl_transcoders.app.cli",
    "tl_transcoders.demo": "tl_transcoders.app.demo",
    "tl_transcoders.corpus": "tl_transcoders.app.corpus",
}
"""Old module path -> new module path (submodules of a moved package move with it)."""


def new_name(name: str) -> str | None:
    """The new path of a module imported by its old path `name`, or None if it did not move."""
    for old, new in MOVED_MODULES.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return None


def warn_moved(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(
        f"{old} has moved to {new}; the old name will stop working in the next release",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves an old module path with the module at its new path."""

    def find_spec(self, name: str, path: Any = None, target: Any = None):
        if new_name(name) is None:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        new = new_name(spec.name)
        warn_moved(spec.name, new, stacklevel=6)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        """The module at the new path is already executed."""


def install() -> None:
    """Put the moved-module finder first on `sys.meta_path` (once)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())


def old_attribute(name: str) -> Any:
    """`tl_transcoders.<name>` for an old submodule name (e.g. `tl_transcoders.sites`
    used without importing it): the module at its new path, with a warning."""
    old = f"tl_transcoders.{name}"
    if old not in MOVED_MODULES:
        raise AttributeError(f"module 'tl_transcoders' has no attribute {name!r}")
    return importlib.import_module(old)


def for_model(
    cls,
    model: Any,
    layer: int,
    d_latent: int,
    input_site: str | None = None,
    output_site: str | None = None,
    **fields: Any,
):
    """Deprecated: `tl_transcoders.transcoder_config(model, layer, d_latent, ...)`."""
    from tl_transcoders.hooks.sites import transcoder_config

    warn_moved("TranscoderConfig.for_model", "tl_transcoders.transcoder_config")
    return transcoder_config(model, layer, d_latent, input_site, output_site, **fields)


def from_pretrained(cls, repo_or_dir: Any, subfolder: str | None = None, revision: str | None = None, **kwargs: Any):
    """Deprecated: `tl_transcoders.load_pretrained(repo_or_dir, subfolder, revision, ...)`."""
    from tl_transcoders.io.loading import load_pretrained

    warn_moved("Transcoder.from_pretrained", "tl_transcoders.load_pretrained")
    return load_pretrained(repo_or_dir, subfolder, revision, **kwargs)


def attach_deprecated_methods() -> None:
    """Give `TranscoderConfig` and `Transcoder` back their old classmethods."""
    from tl_transcoders.core.config import TranscoderConfig
    from tl_transcoders.core.transcoder import Transcoder

    TranscoderConfig.for_model = classmethod(for_model)
    Transcoder.from_pretrained = classmethod(from_pretrained)
