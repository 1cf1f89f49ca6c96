"""Token batches for training: a `datasets` corpus, tokenized and packed into rows.

`load_text_dataset` loads a corpus from the Hugging Face Hub or from local files;
`token_batches` turns it into `[batch, context]` int64 tensors of token ids.

Packing. The documents are concatenated into one token stream, with a separator token
(by default the tokenizer's EOS) between consecutive documents. The stream is cut into
rows: each row is a BOS token (by default the tokenizer's) followed by the next
`context_size - 1` stream tokens, so a document may continue from one row into the
next, and no row is padded. Only full rows and full batches are yielded: the end of
the stream that does not fill a whole batch is dropped. Given the same dataset order
the batches are always the same, which is what makes `skip_batches` an exact resume.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from datasets import Dataset, IterableDataset, load_dataset
from jaxtyping import Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from tl_transcoders.core.errors import TranscodersError, check_at_least, summary, whole_number

__all__ = [
    "BUILDERS",
    "COMPRESSIONS",
    "DataError",
    "DataNotFoundError",
    "FROM_TOKENIZER",
    "PRETOKENIZED_COLUMN",
    "TOKENIZE_BATCH",
    "builder_for",
    "load_text_dataset",
    "local_data_files",
    "token_batches",
]

BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}
"""The `datasets` builder for each local data file extension."""

COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
"""Compression suffixes allowed after a data file extension (`.jsonl.gz`)."""

TOKENIZE_BATCH = 256
"""Documents read from the dataset and tokenized per tokenizer call."""

PRETOKENIZED_COLUMN = "input_ids"
"""A dataset with this column is taken as already tokenized."""


class DataError(TranscodersError, ValueError):
    """A corpus that cannot be read or packed into token batches, with what to do."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A local path that names no data file, or a Hub dataset that cannot be reached."""


class _FromTokenizer:
    def __repr__(self) -> str:
        return "FROM_TOKENIZER"


FROM_TOKENIZER = _FromTokenizer()
"""Default of `token_batches`' special token arguments: take the id from the tokenizer."""


def builder_for(path: str) -> str | None:
    """The `datasets` builder that reads a data file (`json`, `text`, `parquet`,
    `csv`), from its extension; None when the extension is not a data file's."""
    name = path.lower()
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return BUILDERS.get(os.path.splitext(name)[1])


def _looks_local(path: str) -> bool:
    """True for what can only be a local path, never a Hub dataset name."""
    return path.startswith((".", "/", "~")) or os.path.isabs(path) or builder_for(path) is not None


def local_data_files(path: str) -> list[str] | None:
    """The data files that `path` names, sorted: the file itself, the data files
    anywhere under a directory (hidden ones skipped), or the files a glob matches.
    An empty list when `path` is local but names nothing; None when it is not a
    local path (a Hub dataset name)."""
    expanded = os.path.expanduser(path)
    if os.path.isfile(expanded):
        return [expanded]
    if os.path.isdir(expanded):
        files = []
        for root, dirs, names in os.walk(expanded):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files += [os.path.join(root, n) for n in names if not n.startswith(".") and builder_for(n)]
        return sorted(files)
    if glob.has_magic(expanded):
        return sorted(f for f in glob.glob(expanded, recursive=True) if os.path.isfile(f))
    return [] if _looks_local(path) else None


def load_text_dataset(
    path_or_name: str | os.PathLike,
    split: str = "train",
    streaming: bool = False,
    data_files: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
    **kwargs: Any,
) -> Dataset | IterableDataset:
    """Load one split of a corpus, from the Hub or from local files.

    `path_or_name` is a Hub dataset name (`"NeelNanda/pile-10k"`), a builder name
    with `data_files` (`"json"`), or local data: a file, a glob (`"data/*.jsonl.gz"`,
    `"data/**/*.parquet"`) or a directory (every data file under it). The builder
    of local data is inferred from the extension: `.json`/`.jsonl` -> json, `.txt` ->
    text (one document per line; pass `sample_by="document"` for one per file),
    `.parquet`, `.csv`, each optionally compressed (`.gz`, `.bz2`, `.xz`, `.zst`).
    Local files are read in sorted order and become the split `split`.

    With `streaming=True` the result is an `IterableDataset` read lazily. Other
    keyword arguments go to `datasets.load_dataset` (`name`, `cache_dir`,
    `revision`, ...). Raises `DataNotFoundError` (a `FileNotFoundError`) naming the
    path when a local path matches no data file or a Hub name cannot be loaded,
    `DataError` (a `ValueError`) when the format cannot be inferred.
    """
    path = os.fspath(path_or_name)
    files = None if data_files is not None else local_data_files(path)
    if files is None:
        try:
            return load_dataset(path, split=split, streaming=streaming, data_files=data_files, **kwargs)
        except (OSError, ValueError) as err:  # DatasetNotFoundError, ConnectionError, a bad split
            if data_files is not None:
                raise
            raise DataNotFoundError(
                f"{path!r} is neither local data (a file, directory or glob that exists) nor a dataset that could "
                f"be loaded from the Hugging Face Hub ({summary(err)}); "
                "check the path, the name, the split and that the Hub can be reached"
            ) from err
    if not files:
        raise DataNotFoundError(
            f"no data files match {path!r}: expected an existing file, a directory holding "
            f"data files or a glob matching some ({', '.join(BUILDERS)}, optionally "
            f"{'/'.join(COMPRESSIONS)}). A dataset written by save_to_disk loads with "
            "datasets.load_from_disk."
        )
    builders = {f: builder_for(f) for f in files}
    unknown = [f for f, b in builders.items() if b is None]
    if unknown:
        raise DataError(
            f"cannot tell the format of {unknown[0]!r} from its extension (supported: "
            f"{', '.join(BUILDERS)}); name the builder instead, e.g. "
            f"load_text_dataset('json', data_files=[...])"
        )
    if len(set(builders.values())) > 1:
        kinds = sorted(set(builders.values()))
        raise DataError(
            f"{path!r} mixes data files of different formats ({', '.join(kinds)}); load one format at a time"
        )
    builder = builders[files[0]]
    return load_dataset(builder, data_files={split: files}, split=split, streaming=streaming, **kwargs)


def _special_token(value: int | None | _FromTokenizer, tokenizer: Any, attribute: str, name: str) -> int | None:
    """The id for a special token argument: `value`, or the tokenizer's `attribute`."""
    if isinstance(value, _FromTokenizer):
        if tokenizer is None:
            raise DataError(f"{name}: there is no tokenizer to take it from; pass {name}=<token id> or None")
        return getattr(tokenizer, attribute, None)
    if value is not None and (whole_number(value) is None or value < 0):
        raise DataError(f"{name} must be a token id (an integer >= 0) or None, got {value!r}")
    return value


def _pick_column(columns: Sequence[str], text_column: str) -> str:
    """The column to read: `input_ids` when present (pre-tokenized), else `text_column`."""
    if PRETOKENIZED_COLUMN in columns:
        return PRETOKENIZED_COLUMN
    if text_column in columns:
        return text_column
    raise DataError(
        f"the dataset has no text column {text_column!r} (and no pre-tokenized "
        f"{PRETOKENIZED_COLUMN!r} column); its columns are {list(columns)}. "
        "Pass text_column=<the column holding the text>."
    )


def _documents(dataset: Dataset | IterableDataset, tokenizer: Any, text_column: str) -> Iterator[list[int]]:
    """The token ids of each document, in dataset order; text is tokenized in calls
    of `TOKENIZE_BATCH` documents, without the tokenizer's own special tokens."""
    column = None
    if dataset.column_names is not None:
        column = _pick_column(dataset.column_names, text_column)
        dataset = dataset.select_columns([column])
    for chunk in dataset.with_format(None).iter(batch_size=TOKENIZE_BATCH):
        if column is None:  # a streaming dataset that does not know its columns before reading
            column = _pick_column(list(chunk), text_column)
        values = chunk[column]
        if column == PRETOKENIZED_COLUMN:
            for ids in values:
                if not isinstance(ids, (list, tuple)) or not all(whole_number(i) is not None for i in ids):
                    raise DataError(
                        f"column {column!r} should hold one list of integer token ids per document, found {ids!r:.80}"
                    )
                yield ids
            continue
        if tokenizer is None:
            raise DataError(f"column {column!r} holds text: pass a tokenizer to tokenize it")
        bad = [v for v in values if not isinstance(v, str)]
        if bad:
            raise DataError(f"column {column!r} should hold strings, found a {type(bad[0]).__name__}: {bad[0]!r:.80}")
        yield from tokenizer(values, add_special_tokens=False, verbose=False, return_attention_mask=False)["input_ids"]


def _pack(
    documents: Iterator[list[int]],
    batch_size: int,
    context_size: int,
    bos: int | None,
    separator: int | None,
    max_batches: int | None,
    skip_batches: int,
) -> Iterator[Int[Tensor, "batch context"]]:
    """Pack documents into full batches (see the module docstring); the first
    `skip_batches` are produced but not built or yielded."""
    width = context_size - (bos is not None)
    needed = batch_size * width
    stream: list[int] = []
    produced = n_documents = n_tokens = 0
    for ids in documents:
        if len(ids) == 0:
            continue
        if separator is not None and n_documents:
            stream.append(separator)
        stream.extend(ids)
        n_documents += 1
        n_tokens += len(ids)
        start = 0
        while len(stream) - start >= needed:
            produced += 1
            if produced > skip_batches:
                rows = torch.tensor(stream[start : start + needed], dtype=torch.int64).view(batch_size, width)
                if bos is not None:
                    rows = torch.cat([torch.full((batch_size, 1), bos, dtype=torch.int64), rows], dim=1)
                yield rows
            start += needed
            if produced == max_batches:
                return
        del stream[:start]
    if produced == 0:
        raise DataError(
            f"the dataset produced no full batch of batch_size x context_size = {batch_size} x "
            f"{context_size} tokens: it has {n_documents} non-empty documents, {n_tokens} tokens. "
            "Use more data or a smaller batch_size or context_size."
        )


def token_batches(
    dataset: Dataset | IterableDataset,
    tokenizer: PreTrainedTokenizerBase | None,
    context_size: int,
    batch_size: int,
    text_column: str = "text",
    bos_token_id: int | None | _FromTokenizer = FROM_TOKENIZER,
    separator_token_id: int | None | _FromTokenizer = FROM_TOKENIZER,
    max_tokens: int | None = None,
    skip_batches: int = 0,
) -> Iterator[Int[Tensor, "batch context"]]:
    """Batches of packed token ids, `[batch_size, context_size]` int64, for training.

    `dataset` is a map-style `Dataset` or a streaming `IterableDataset`. If it has an
    `input_ids` column, that is used as is (pre-tokenized documents, which should not
    hold BOS or separator tokens themselves; `tokenizer` may then be None). Otherwise
    `text_column` is tokenized by `tokenizer` without its own special tokens.
    Documents that have no tokens are skipped.

    Packing (see the module docstring): `separator_token_id` (default: the tokenizer's
    EOS; None for none) goes between consecutive documents, and each row is
    `bos_token_id` (default: the tokenizer's BOS; None for none) followed by
    `context_size - 1` stream tokens (`context_size` without BOS). Only full rows and
    full batches are yielded; the rest of the stream is dropped.

    `max_tokens` stops after that many tokens (BOS included), rounded down to whole
    batches. `skip_batches` skips the first batches (to resume training exactly):
    the result equals the batches without it, less the first `skip_batches`, and
    `max_tokens` counts the skipped batches too.

    Argument errors raise `DataError` at once; a dataset without one full batch raises
    `DataError` when iterated.
    """
    if isinstance(dataset, dict):
        raise DataError(
            f"expected one split of a dataset, got a {type(dataset).__name__} with splits "
            f"{list(dataset)}; pick one, e.g. dataset['train']"
        )
    check_at_least(DataError, 2, context_size=context_size)
    check_at_least(DataError, 1, batch_size=batch_size)
    check_at_least(DataError, 0, skip_batches=skip_batches)
    max_batches = None
    if max_tokens is not None:
        max_batches = max_tokens // (batch_size * context_size)
        if max_batches < 1:
            raise DataError(
                f"max_tokens={max_tokens} is less than one batch of batch_size x context_size = "
                f"{batch_size} x {context_size} tokens"
            )
    bos = _special_token(bos_token_id, tokenizer, "bos_token_id", "bos_token_id")
    separator = _special_token(separator_token_id, tokenizer, "eos_token_id", "separator_token_id")
    if dataset.column_names is not None:
        column = _pick_column(dataset.column_names, text_column)  # fail now, not on first use
        if column != PRETOKENIZED_COLUMN and tokenizer is None:
            raise DataError(f"column {column!r} holds text: pass a tokenizer to tokenize it")
    documents = _documents(dataset, tokenizer, text_column)
    return _pack(documents, batch_size, context_size, bos, separator, max_batches, skip_batches)
