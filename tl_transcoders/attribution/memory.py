"""What one `attribute` call holds in memory, predicted before its rows are computed.

Attribution records one forward pass of the frozen replacement model, then computes
rows (one per target: the logits, then the features chosen by influence) in batched
backward passes, and finally gathers the graph's adjacency from the rows. Its peak is

    base + held + rows + max(forward + batch, adjacency)

(the forward pass's graph is released before the adjacency is built)

- `base`: what the process (or the GPU) held before: the model, the transcoders;
- `held`: what attribution keeps from the pass until the graph is built: every active
  feature's identity and activation, the error vectors, the latents and MLP outputs
  (`tensor_bytes` of them);
- `forward`: the tensors the recorded forward pass keeps for the backward passes,
  measured while it runs (`SavedTensorBytes`);
- `rows`: `n_rows x n_columns` values (every active feature, error and token is a
  column), or one block of them where the rows are spilled to a file (`rows.RowStore`);
- `batch`: one backward batch: the gradients read at every layer's MLP output, the
  batch's rows, and one block of gathered decoder vectors (`DECODE_BLOCK_BYTES`);
- `adjacency`: the graph's `n_nodes x n_nodes` matrix.

`plan` picks the largest backward batch, rows in memory if they fit and are at most
`ROWS_IN_MEMORY_BYTES`, and otherwise spilled rows, such that the peak fits the memory
budget (by default most of the memory still available), or refuses with the breakdown.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tl_transcoders.attribution.errors import AttributionError
from tl_transcoders.attribution.rows import block_rows

__all__ = [
    "DECODE_BLOCK_BYTES",
    "ROWS_IN_MEMORY_BYTES",
    "AttributionMemory",
    "SavedTensorBytes",
    "available_memory",
    "current_memory",
    "plan",
    "return_freed_memory",
    "tensor_bytes",
]

ROWS_IN_MEMORY_BYTES = 1 << 30
"""Rows larger than this always go to a file: reading them back a block at a time costs
little beside the backward passes, and memory then does not grow with the rows."""
DECODE_BLOCK_BYTES = 64 << 20
"""About the most bytes of decoder vectors a backward batch gathers at a time."""
GRADIENT_COPIES = 19
"""Batch-sized `[n_pos, d_model]` tensors a backward pass holds besides the gradients it
returns (the injected gradients and the intermediates of one layer's backward), as
measured on SmolLM2-135M at 256 and 1,024 tokens: the peak grows by about
`n_layers + 1 + 19` residual-sized tensors per row of a batch."""


@dataclass(frozen=True)
class AttributionMemory:
    """The predicted peak memory of one `attribute` call, in bytes, by part (see the
    module docstring), and the choices it was predicted for."""

    base: int
    held: int
    forward: int
    rows: int
    batch: int
    adjacency: int
    batch_size: int
    """Rows per backward pass."""
    spill: bool
    """Whether the rows are kept in a temporary file instead of memory."""
    n_features: int
    """Active features on the prompt (columns of the rows)."""

    @property
    def total(self) -> int:
        """The predicted peak."""
        return self.base + self.held + self.rows + max(self.forward + self.batch, self.adjacency)

    def describe(self) -> str:
        """The parts in GiB, for messages."""
        parts = {k: getattr(self, k) for k in ("base", "held", "forward", "rows", "batch", "adjacency")}
        shown = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in parts.items())
        where = "spilled to a file" if self.spill else "in memory"
        return (
            f"{self.total / 2**30:.2f} GiB ({shown}; batch_size {self.batch_size}, rows {where}, "
            f"{self.n_features} active features)"
        )


def plan(
    *,
    n_pos: int,
    n_layers: int,
    d_model: int,
    n_features: int,
    n_rows: int,
    n_nodes: int,
    max_active: int,
    itemsize: int,
    base: int,
    held: int,
    forward: int,
    batch_size: int,
    budget: int | None,
) -> AttributionMemory:
    """The attribution memory for the largest backward batch up to `batch_size`, with
    rows in memory if they fit `budget` and `ROWS_IN_MEMORY_BYTES`, spilled otherwise
    (`budget` None: no limit). `n_rows`
    rows of `n_features` plus error and token columns; `max_active` the most active
    features of a layer at one position. Raises `AttributionError` with the smallest
    breakdown when nothing fits."""
    n_columns = n_features + (n_layers + 1) * n_pos
    row_bytes = n_columns * itemsize
    residual = n_pos * d_model * itemsize

    def option(size: int, spill: bool) -> AttributionMemory:
        gradients = (n_layers + 1 + GRADIENT_COPIES) * size * residual
        position_bytes = max_active * d_model * itemsize  # one position's decoder vectors
        decoders = 3 * min(n_pos * position_bytes, DECODE_BLOCK_BYTES + position_bytes)
        batch = gradients + 2 * size * row_bytes + decoders
        block = min(block_rows(row_bytes), n_rows) * row_bytes
        rows = 3 * block if spill else n_rows * row_bytes
        adjacency = n_nodes * n_nodes * itemsize
        return AttributionMemory(base, held, forward, rows, batch, adjacency, size, spill, n_features)

    sizes = [batch_size]
    while sizes[-1] > 1:
        sizes.append(sizes[-1] // 2)
    options = [option(size, True) for size in sizes]
    if n_rows * row_bytes <= ROWS_IN_MEMORY_BYTES:
        options.insert(0, option(batch_size, False))
    for candidate in options:
        if budget is None or candidate.total <= budget:
            return candidate
    smallest = options[-1]
    raise AttributionError(
        f"attributing this prompt needs about {smallest.describe()} at the least, more than the "
        f"memory budget of {budget / 2**30:.2f} GiB: shorten the prompt, lower max_feature_nodes, "
        "use sparser transcoders or raise memory_budget"
    )


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """The bytes of the storages under `tensors`, each storage counted once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def current_memory(device: torch.device) -> int:
    """What is in use now: the GPU's allocated memory for a CUDA device, else this
    process's resident memory (0 where the system does not say)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    statm = Path("/proc/self/statm")
    if statm.is_file():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def available_memory(device: torch.device) -> int | None:
    """The default budget: 90% of the GPU's memory for a CUDA device, else 80% of what
    this process holds plus what the system has available (None where unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.9 * (free + torch.cuda.memory_allocated(device)))
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
    if "MemAvailable" not in fields:
        return None
    available = int(fields["MemAvailable"].split()[0]) * 1024
    return int(0.8 * (available + current_memory(device)))


def return_freed_memory() -> None:
    """Hand memory freed inside the process back to the system where the C library can
    (glibc's `malloc_trim`), so that what an estimate's forward pass freed does not stay
    in this process's resident memory and count as the next call's base, and what
    attribution's backward batches freed is not held beside the adjacency built after
    them."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError, TypeError):  # not glibc
        pass


class SavedTensorBytes(contextlib.AbstractContextManager):
    """Inside `with SavedTensorBytes(model) as saved:`, count the bytes of the tensors
    that autograd keeps for the backward pass (each storage once, the model's own
    parameters and buffers not counted): `saved.bytes`.

    The hook keeps a detached view of each saved tensor: keeping the tensor itself would
    make a node that saves its own output refer to itself through Python, a cycle the
    garbage collector cannot see, and the whole recorded pass would outlive the call."""

    def __init__(self, model: nn.Module):
        owned = [*model.parameters(), *model.buffers()]
        self._known = {t.untyped_storage().data_ptr() for t in owned}
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._known:
            self._known.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return tensor.detach()

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
