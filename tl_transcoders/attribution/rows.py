"""`RowStore`: the graph rows computed by `attribute`, in memory or spilled to a file.

A row holds one target's direct effects from every source column (all active features,
errors, tokens), so the rows of a long prompt (about a thousand rows times millions of
active features) can outgrow memory. `RowStore` keeps them as one tensor on a device
while they fit, or else in an unlinked temporary file, written one batch at a time and
read back in blocks of rows: memory then holds one block, and the rows cost disk (and
the system's reclaimable page cache) instead of the process's memory. Either way the
same values come back, so the graph does not depend on where its rows were kept.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["BLOCK_BYTES", "RowStore", "block_rows"]

BLOCK_BYTES = 64 << 20
"""About the most bytes of rows read back (and reduced over) at a time."""


def block_rows(row_bytes: int) -> int:
    """Rows per block for rows of `row_bytes`: within `BLOCK_BYTES`, at most 256."""
    return max(1, min(256, BLOCK_BYTES // max(row_bytes, 1)))


class RowStore:
    """`n_rows` rows of `n_columns` values of `dtype`: a zero tensor on `device`, or
    with `spill` a temporary file (deleted when the store is closed or collected),
    whose blocks are returned on `device`."""

    def __init__(self, n_rows: int, n_columns: int, dtype: torch.dtype, device: torch.device, spill: bool):
        self.n_rows, self.n_columns, self.dtype, self.device = n_rows, n_columns, dtype, device
        self.row_bytes = n_columns * dtype.itemsize
        self.block_rows = block_rows(self.row_bytes)
        self.spilled = spill
        if spill:
            self._file = tempfile.TemporaryFile(prefix="tl-transcoders-rows-")
            self._file.truncate(n_rows * self.row_bytes)  # sparse: unwritten rows read as zeros
        else:
            self._rows = torch.zeros(n_rows, n_columns, dtype=dtype, device=device)

    def write(self, start: int, block: Float[Tensor, "n n_columns"]) -> None:
        """Store `block` as rows `start`, `start + 1`, ..."""
        if not self.spilled:
            self._rows[start : start + block.shape[0]] = block.to(self.device)
            return
        data = block.detach().to(device="cpu", dtype=self.dtype).contiguous()
        self._file.seek(start * self.row_bytes)
        self._file.write(data.view(torch.uint8).numpy().data)

    def read(self, start: int, stop: int) -> Float[Tensor, "n n_columns"]:
        """Rows `start` to `stop` (a view in memory; read from the file when spilled)."""
        if not self.spilled:
            return self._rows[start:stop]
        buffer = bytearray((stop - start) * self.row_bytes)
        self._file.seek(start * self.row_bytes)
        self._file.readinto(buffer)
        return torch.frombuffer(buffer, dtype=self.dtype).view(stop - start, self.n_columns).to(self.device)

    def blocks(self, stop: int) -> Iterator[Float[Tensor, "block n_columns"]]:
        """Rows `0` to `stop` in order, `block_rows` at a time."""
        for start in range(0, stop, self.block_rows):
            yield self.read(start, min(start + self.block_rows, stop))

    def gather(self, rows: Int[Tensor, " r"], columns: Int[Tensor, " c"]) -> Float[Tensor, "r c"]:
        """The values at `rows` x `columns`, read one block of rows at a time."""
        out = torch.zeros(rows.numel(), columns.numel(), dtype=self.dtype, device=self.device)
        rows, columns = rows.to(self.device), columns.to(self.device)
        for start in range(0, self.n_rows, self.block_rows):
            inside = ((rows >= start) & (rows < start + self.block_rows)).nonzero(as_tuple=True)[0]
            if inside.numel():
                block = self.read(start, min(start + self.block_rows, self.n_rows))
                out[inside] = block[(rows[inside] - start)[:, None], columns]
        return out

    def close(self) -> None:
        """Release the rows (and delete the file)."""
        if self.spilled:
            self._file.close()
        else:
            self._rows = torch.zeros(0, self.n_columns, dtype=self.dtype, device=self.device)
