"""`NativeModule`: what every module kept in the native format shares.

`Transcoder` and `CrossLayerTranscoder` hold a config and the parameters it implies
(`shapes_of(cfg)`); this base checks the two agree, saves them (`native.write_directory`,
with the module's kind) and builds a module from a saved directory or from tensors,
without a wasted random initialisation.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from tl_transcoders.core.config import ConfigError
from tl_transcoders.core.devices import checked_device
from tl_transcoders.core.native import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_mappable,
    read_config,
    read_tensors,
    write_directory,
)

__all__ = ["NativeModule"]


class NativeModule(nn.Module):
    """Base of the modules saved in the native format. Subclasses set `KIND` (a key of
    `native.KINDS`), `CONFIG` (their config class) and `shapes_of` (the name and shape
    of every tensor of a config), and build their parameters from `cfg` in
    `__init__(cfg, device=None)`."""

    KIND: ClassVar[str]
    CONFIG: ClassVar[type]
    cfg: Any

    def __init__(self) -> None:
        """Subclasses call this first, then set `self.cfg` and their parameters."""
        super().__init__()

    @classmethod
    def checked_config(cls, cfg: Any) -> Any:
        """`cfg` (a `CONFIG`, or a dict of its fields) validated; `ConfigError` for
        anything else."""
        if isinstance(cfg, Mapping):
            cfg = cls.CONFIG.from_dict(dict(cfg))
        if not isinstance(cfg, cls.CONFIG):
            raise ConfigError(
                f"{cls.__name__} takes a {cls.CONFIG.__name__} (or a dict of its fields), got {type(cfg).__name__}"
            )
        cfg.validate()
        return cfg

    @staticmethod
    def shapes_of(cfg: Any) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def validate(self) -> None:
        """Raise `ConfigError` if the config is invalid or the parameters do not have the
        shapes it implies (a config or a tensor changed after construction)."""
        self.cfg.validate()
        expected = self.shapes_of(self.cfg)
        found = {name: tuple(p.shape) for name, p in self.named_parameters()}
        if found != expected:
            wrong = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
            details = ", ".join(f"{name}: {found.get(name)} (config needs {expected.get(name)})" for name in wrong)
            raise ConfigError(
                f"the parameters do not match the config: {details}. Was cfg or a weight changed after "
                f"the module was built? Build a new {type(self).__name__} from the config you want."
            )

    def check_unchanged(self) -> None:
        """`validate` again where the config or a parameter's shape changed since the
        last check (cheap otherwise): the forward passes call it, so that a config
        edited after construction (`cfg.k = 10000`, `cfg.skip = False`) or a replaced
        weight is refused (`ConfigError`) instead of silently used."""
        state = (vars(self.cfg), [(name, p.shape) for name, p in self.named_parameters()])
        checked = self.__dict__.get("_validated_state")
        if state == checked:
            return
        try:
            self.validate()
        except ConfigError as err:
            if checked is None:
                raise
            changed = sorted(name for name, value in state[0].items() if checked[0].get(name) != value)
            raise ConfigError(
                f"{type(self).__name__}: the config was changed after the module was built "
                f"({', '.join(changed) or 'a parameter'}): {err}"
            ) from err
        self.__dict__["_validated_state"] = copy.deepcopy(state)

    def nonfinite_parameters(self) -> list[str]:
        """The names of the parameters holding NaN or inf. Memory-mapped weights (`load`
        with `mmap=True`) were checked as they were loaded and are read again only
        after an in-place change, so that checking a module larger than memory does not
        read it all."""
        checked = getattr(self, "_checked_finite", {})
        return [
            name
            for name, p in self.named_parameters()
            if not p.is_meta and checked.get(name) != p._version and not torch.isfinite(p).all()
        ]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `config.json` and `transcoder.safetensors` into `directory`, replacing a
        module saved there before as a whole (an interrupted save leaves the old one
        loadable). Refuses NaN or inf weights and a directory holding other files."""
        self.validate()
        tensors = {name: p.detach().cpu().contiguous() for name, p in self.state_dict().items()}
        config = self.cfg.to_dict()
        config["dtype"] = str(next(self.parameters()).dtype).removeprefix("torch.")
        return write_directory(directory, config, tensors, kind=self.KIND)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        mmap: bool = False,
    ):
        """Read a module written by `save`, checking every field, the weights' checksum
        and every tensor; the module is returned in eval mode.

        With `mmap=True` the weights stay in the file, mapped into memory (copy-on-write:
        the file is never changed) and read when touched: a cross-layer transcoder
        larger than memory can attribute a prompt, which reads only its active latents'
        decoder rows. The checks still read the whole file once, one block at a time. It
        keeps the stored dtype on the CPU (`device` and `dtype` must agree). The file must
        stay as it is while the module lives: one replaced in place (`cp` over it, a
        `save` into the same directory is safe: it writes a new file) changes the
        module's weights, and one truncated ends the process with SIGBUS.

        Raises `TranscoderFileError` naming the file and the problem for a missing or
        corrupt file, an unknown format or version, a directory holding another kind of
        module, a bad config field, a checksum that does not match, or a tensor that is
        missing, unexpected, of the wrong shape or not finite."""
        directory, device = Path(directory), checked_device(device)
        cfg, checksum = read_config(directory / CONFIG_FILE, kind=cls.KIND)
        if mmap:
            check_mappable(directory, device, dtype, cfg.dtype)
        tensors = read_tensors(directory / WEIGHTS_FILE, cls.shapes_of(cfg), checksum, mmap=mmap)
        return cls.from_tensors(cfg, tensors, device, dtype, checked_finite=mmap)

    @classmethod
    def from_tensors(
        cls,
        cfg: Any,
        tensors: dict[str, Tensor],
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        checked_finite: bool = False,
    ):
        """A module holding `tensors` (named and shaped as `shapes_of(cfg)`), in `dtype`
        (default: that of `W_enc`) on `device` (default: the tensors'), in eval mode;
        built without a wasted random initialisation. `checked_finite`: the values were
        checked as they were read (`read_tensors`), so `nonfinite_parameters` reads them
        again only after an in-place change (for memory-mapped weights)."""
        device = checked_device(device)
        cfg = dataclasses.replace(cfg, dtype=str(dtype or tensors["W_enc"].dtype).removeprefix("torch."))
        with torch.device("meta"):
            module = cls(cfg)
        target = getattr(torch, cfg.dtype)
        module.load_state_dict(
            {k: v.to(device=device, dtype=target).contiguous() for k, v in tensors.items()}, assign=True
        )
        module.validate()
        if checked_finite:
            module._checked_finite = {name: p._version for name, p in module.named_parameters()}
        return module.eval()
