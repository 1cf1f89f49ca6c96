"""Devices named by the user, checked before anything is placed on them.

`checked_device("cuda")` on a machine without CUDA, or a misspelt device, would otherwise
fail deep inside torch (`AssertionError: Torch not compiled with CUDA enabled`,
`RuntimeError: Invalid device string`) after files were read; every entry point that
takes a `device=` passes it through here first.
"""

from __future__ import annotations

import torch

from tl_transcoders.core.errors import TranscodersError

__all__ = ["DeviceError", "checked_device"]


class DeviceError(TranscodersError, ValueError):
    """A device that torch does not know or that this machine does not have."""


def checked_device(device: str | torch.device | None) -> torch.device | None:
    """`device` as a `torch.device` (None stays None: the caller's default), after
    checking that torch knows it and that this machine has it (CUDA, MPS, XPU)."""
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"{device!r} is not a device torch knows (e.g. 'cpu', 'cuda', 'cuda:1', 'mps')") from err
    if resolved.type in ("cpu", "meta"):
        return resolved
    backend = getattr(torch, resolved.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise DeviceError(
            f"device {str(resolved)!r} is not available on this machine "
            f"(torch.{resolved.type}.is_available() is False); use device='cpu' or a device it has"
        )
    count = getattr(backend, "device_count", None)
    if resolved.index is not None and count is not None and resolved.index >= count():
        raise DeviceError(
            f"device {str(resolved)!r} does not exist: this machine has {count()} {resolved.type} devices"
        )
    return resolved
