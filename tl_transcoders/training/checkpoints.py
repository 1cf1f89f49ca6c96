"""Training checkpoints that an interruption cannot destroy, and the record of a run.

A checkpoint (`checkpoint.pt`) holds everything a run depends on. It is written under a
temporary name; only when it is complete does the current one become the previous
checkpoint (`checkpoint.prev.pt`) and the new one take its name. So at every moment a
complete checkpoint exists, and `read_checkpoint` falls back to the previous one (and
says so) when the latest is missing or damaged.

The run record (`training.json`) says what a finished `fit` did: its options, the steps
and tokens it trained, and whether it reached `max_tokens` (`complete`).
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from tl_transcoders.core.errors import TranscodersError
from tl_transcoders.core.files import atomic_write

__all__ = [
    "CHECKPOINT_FILE",
    "RECORD_FILE",
    "TrainingError",
    "checkpoint_files",
    "previous_checkpoint",
    "read_checkpoint",
    "write_checkpoint",
    "write_record",
]

CHECKPOINT_FILE = "checkpoint.pt"
RECORD_FILE = "training.json"


class TrainingError(TranscodersError, ValueError):
    """A training run that cannot start, continue or be resumed, with what to do."""


def previous_checkpoint(path: Path) -> Path:
    """Where the checkpoint before `path` is kept (`checkpoint.prev.pt`)."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def checkpoint_files(path: Path) -> list[Path]:
    """The checkpoint at `path` and its previous one, those that exist."""
    return [p for p in (path, previous_checkpoint(path)) if p.exists()]


def write_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write `state` to `path`, keeping the checkpoint it replaces as the previous one;
    nothing is replaced until the new file is complete, and no temporary file is left
    behind if writing fails."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        if path.exists():
            os.replace(path, previous_checkpoint(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


_STATE_KEYS = {
    "config": dict,
    "transcoders": dict,
    "optimizer": dict,
    "schedule": dict,
    "step": int,
    "batches_seen": int,
    "since_fired": dict,
    "scales": dict,
    "buffer": dict,
    "generator": torch.Tensor,
    "history": list,
}
"""What a checkpoint written by `Trainer.save_checkpoint` holds, and the type of each."""


def _load(path: Path) -> dict[str, Any]:
    state = torch.load(path, weights_only=False, map_location="cpu")
    if not isinstance(state, dict):
        raise ValueError("not a training checkpoint")
    wrong = sorted(key for key, kind in _STATE_KEYS.items() if not isinstance(state.get(key), kind))
    if wrong:
        raise ValueError(f"not a whole training checkpoint: {wrong} missing or of the wrong type")
    return state


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The state in the checkpoint at `path`, or in the previous one (with a warning)
    when `path` is missing, truncated or damaged. Tensors come back on the CPU."""
    failures = []
    for candidate in checkpoint_files(path):
        try:
            state = _load(candidate)
        except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            failures.append(f"{candidate.name}: {type(err).__name__}: {str(err)[:200]}")
            continue
        if failures:
            warnings.warn(
                f"the latest checkpoint could not be read ({failures[0]}); resuming from the previous "
                f"one, {candidate} (step {state['step']})",
                stacklevel=3,
            )
        return state
    detail = "; ".join(failures) if failures else "none exists"
    raise TrainingError(
        f"no readable checkpoint at {path} or {previous_checkpoint(path).name} ({detail}); "
        "start a fresh run with overwrite=True"
    )


def write_record(path: Path, record: dict[str, Any]) -> Path:
    """Write the run record `record` (JSON-ready) to `path`, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    return path
