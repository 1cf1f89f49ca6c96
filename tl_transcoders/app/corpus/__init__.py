"""A small public-domain English corpus shipped inside the package.

The default text of `tl-transcoders demo` and the example notebooks, so that they run
with no download: about 1.4M training tokens and 90k held-out tokens (SmolLM2
tokenizer) from three public-domain texts. Provenance and the selection rule are in
`PROVENANCE.md` beside this file; `scripts/build_corpus.py` rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from tl_transcoders.io.data import DataError, DataNotFoundError

__all__ = ["DIRECTORY", "SPLITS", "embedded_corpus"]

DIRECTORY = Path(__file__).resolve().parent
SPLITS = ("train", "heldout")


def embedded_corpus(split: str = "train") -> datasets.Dataset:
    """The embedded corpus as a `datasets.Dataset` with columns `text` and `source`.

    `split` is "train" or "heldout" (disjoint chunks of the same three sources)."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    path = DIRECTORY / f"{split}.jsonl.gz"
    if not path.is_file():
        raise DataNotFoundError(f"{path} is missing: reinstall tl-transcoders (the package data was not installed)")
    return datasets.load_dataset("json", data_files=str(path), split="train")
