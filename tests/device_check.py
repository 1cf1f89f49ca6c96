"""A CPU-side check for device mistakes: record every tensor the library creates with a
factory function (`torch.zeros`, `torch.tensor`, `torch.arange`, ...) without saying on
which device. On a CPU-only machine such a tensor lands where the model is by luck; on
a GPU it would sit on the CPU beside CUDA tensors. Tensors made with `new_*`, `*_like`
or an explicit `device=` follow their inputs and are not recorded."""

from __future__ import annotations

import os
import sys

import torch
import torch.utils._device as torch_device
from torch.overrides import TorchFunctionMode

import tl_transcoders

PACKAGE = os.path.dirname(tl_transcoders.__file__)
TORCH = os.path.dirname(torch.__file__)
FACTORIES = torch_device._device_constructors()


class FactoryCalls(TorchFunctionMode):
    """Inside the block, `self.calls` collects `file:line factory` for each factory call
    made directly by tl_transcoders code without an explicit device."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(PACKAGE):
                where = os.path.relpath(frame.f_code.co_filename, os.path.dirname(PACKAGE))
                self.calls.append(f"{where}:{frame.f_lineno} {func.__name__}")
        return func(*args, **kwargs)
