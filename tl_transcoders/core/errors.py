"""The base class of every error the library raises on purpose.

Each layer has its own error types (`ConfigError`, `TranscoderFileError`, `SiteError`,
`SpliceError`, `TokenError`, `TrainingError`, ...); they all derive from
`TranscodersError` and from the built-in class that fits them (mostly `ValueError`), so
`except TranscodersError` catches everything the library refuses, and nothing else: the
command line prints these as one line and shows tracebacks only for real crashes.
Messages say what is wrong and what to do about it.
"""

from __future__ import annotations

import operator
from typing import Any

__all__ = ["TensorDtypeError", "TensorInputError", "TranscodersError", "check_at_least", "summary", "whole_number"]


class TranscodersError(Exception):
    """Bad input or state that tl-transcoders refused, with a message that says what to do."""


class TensorInputError(TranscodersError, ValueError):
    """A tensor handed to a transcoder's forward pass that does not fit it: a scalar, or
    a last dimension other than the transcoder's input width."""


class TensorDtypeError(TensorInputError, TypeError):
    """Activations of another dtype than the transcoder's weights (cast one of them)."""


def whole_number(value: Any) -> int | None:
    """`value` as an int if it is an integer (a Python, NumPy or one-element integer torch
    value; not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_at_least(error: type[TranscodersError], least: int, **options: Any) -> None:
    """Raise `error` for the first of `options` (given as `name=value`) whose value is not
    an integer of at least `least`: `check_at_least(AnalysisError, 1, n_top=n_top)`."""
    for name, value in options.items():
        whole = whole_number(value)
        if whole is None or whole < least:
            raise error(f"{name} must be at least {least} (an integer), got {value!r}")


def summary(error: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message` of an exception from another library, cut to
    `limit` characters, to quote inside one of ours."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:limit] if lines else ''}"
