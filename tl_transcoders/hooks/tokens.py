"""Token input, checked once, where it enters the library.

Every entry point that takes token ids (evaluation, training, attribution,
interventions, dashboards, probing, autointerp, the command line) passes them through
this module, so each mistake gets the same clear `TokenError`: a wrong rank or dtype, no
rows or no positions, an id outside the model's vocabulary, or more positions than the
model's context. Text is tokenized the way the model does it (with its BOS token) and
is refused, never truncated, when it is too long.

Token sets come as one `[batch, pos]` tensor of any number of rows, or as any iterable
of batches: tensors (`[batch, pos]`, or `[pos]` for one row), or mappings with an
`input_ids` entry (a `datasets` dataset with `.with_format("torch")`, for example).
`token_batches_of` reads such a set in one pass and yields checked batches of at most
`batch_size` rows, so that a consumer's memory is bounded by one batch whatever the
number of rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from tl_transcoders.core.errors import TranscodersError
from tl_transcoders.hooks.sites import check_model, model_device

__all__ = [
    "TokenError",
    "TokenInput",
    "check_tokens",
    "prompt_tokens",
    "text_rows",
    "token_batches_of",
]

TokenInput = Any
"""A `[batch, pos]` tensor of token ids, or an iterable of batches (tensors, or mappings
with `input_ids`). Left unshaped in signatures on purpose: `check_tokens` says what is
wrong in the caller's terms."""


class TokenError(TranscodersError, ValueError):
    """Token ids or a prompt that the model cannot take, with what to do about it."""


def check_tokens(
    model: nn.Module, tokens: Any, *, where: str = "tokens", min_positions: int = 1, one_row: bool = False
) -> Int[Tensor, "batch pos"]:
    """`tokens` as a `[batch, pos]` int64 tensor on the model's device, after checking
    that it is an integer tensor of rank 2 (with `one_row`, rank 1 is read as one row)
    with at least one row, between `min_positions` and the model's `n_ctx` positions, and
    ids inside the model's vocabulary. `where` names the input in the error message."""
    check_model(model)
    if isinstance(tokens, (list, tuple)):
        try:
            tokens = torch.as_tensor(tokens, device=model_device(model))
        except (TypeError, ValueError, RuntimeError):
            raise TokenError(f"{where}: a list that is not a rectangle of token ids") from None
    if not isinstance(tokens, Tensor):
        raise TokenError(f"{where}: expected a tensor of token ids, got {type(tokens).__name__}")
    if tokens.ndim == 1 and one_row:
        tokens = tokens[None]
    if tokens.ndim != 2:
        hint = "; for one row of tokens pass tokens[None]" if tokens.ndim == 1 else ""
        raise TokenError(f"{where}: expected a [batch, pos] tensor of token ids, got shape {tuple(tokens.shape)}{hint}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TokenError(f"{where}: token ids must be integers, got {tokens.dtype}")
    if tokens.shape[0] == 0:
        raise TokenError(f"{where}: has no rows")
    n_pos, n_ctx = tokens.shape[1], model.cfg.n_ctx
    if n_pos < min_positions:
        why = " (a next token to predict)" if min_positions == 2 else ""
        raise TokenError(f"{where}: needs at least {min_positions} positions per row{why}, got {n_pos}")
    if n_pos > n_ctx:
        raise TokenError(
            f"{where}: {n_pos} positions exceed the model's context of {n_ctx} tokens; "
            "cut the rows to at most that length"
        )
    low, high = int(tokens.min()), int(tokens.max())
    d_vocab = model.cfg.d_vocab
    if low < 0 or high >= d_vocab:
        raise TokenError(
            f"{where}: token ids must lie in [0, {d_vocab}), the model's vocabulary; got "
            f"{low}..{high}. Were these tokens made with another model's tokenizer?"
        )
    return tokens.to(device=model_device(model), dtype=torch.long)


def token_batches_of(
    model: nn.Module,
    tokens: TokenInput,
    batch_size: int | Callable[[int], int],
    *,
    min_positions: int = 2,
    where: str = "token batch",
) -> Iterator[Int[Tensor, "batch pos"]]:
    """Checked batches of `batch_size` rows (the last may have fewer) from a token set
    (see the module docstring), read in one pass: large parts are split, small ones (a
    stream of single rows, say) gathered. Every row must have the same number of
    positions. `batch_size` may be a function of the number of positions. Raises
    `TokenError` for an empty set or a bad part (naming it)."""
    if not callable(batch_size):
        _check_batch_size(batch_size)
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (Tensor, Iterable)):
        raise TokenError(
            f"expected token ids (a [batch, pos] tensor or an iterable of them), got {type(tokens).__name__}"
        )
    whole = isinstance(tokens, Tensor)
    pending: list[Tensor] = []
    n_pending, n_pos, rows_per_batch = 0, None, 0
    for index, part in enumerate([tokens] if whole else tokens):
        if isinstance(part, Mapping):
            if "input_ids" not in part:
                raise TokenError(f"{where} {index}: a mapping without 'input_ids' (keys {sorted(part)[:8]})")
            part = part["input_ids"]
        label = where if whole else f"{where} {index}"
        batch = check_tokens(model, part, where=label, min_positions=min_positions, one_row=not whole)
        if n_pos is None:
            n_pos = batch.shape[1]
            rows_per_batch = batch_size(n_pos) if callable(batch_size) else batch_size
            _check_batch_size(rows_per_batch)
        elif batch.shape[1] != n_pos:
            raise TokenError(
                f"{label}: has {batch.shape[1]} positions but the first batch has {n_pos}; "
                "use one sequence length for a token set"
            )
        pending.append(batch)
        n_pending += batch.shape[0]
        if n_pending >= rows_per_batch:
            rows = torch.cat(pending) if len(pending) > 1 else pending[0]
            full = (n_pending // rows_per_batch) * rows_per_batch
            yield from rows[:full].split(rows_per_batch)
            pending = [rows[full:]] if full < n_pending else []
            n_pending -= full
    if n_pos is None:
        raise TokenError("no token batches given")
    if n_pending:
        yield torch.cat(pending) if len(pending) > 1 else pending[0]


def _check_batch_size(batch_size: object) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise TokenError(f"batch_size must be a positive integer, got {batch_size!r}")


def prompt_tokens(model: nn.Module, prompt: str | Tensor | Any) -> Int[Tensor, " n_pos"]:
    """A prompt as a 1-D tensor of token ids on the model's device: a string is
    tokenized as the model does (BOS first, if the model prepends one) and must fit the
    context; token ids may be `[n_pos]` or `[1, n_pos]`. Refuses an empty prompt (no
    token besides BOS) and never truncates."""
    check_model(model)
    if isinstance(prompt, str):
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise TokenError("this model has no tokenizer: pass token ids instead of a string")
        tokens = model.to_tokens(prompt, truncate=False)[0]
        where = "the prompt"
    else:
        if isinstance(prompt, Tensor) and prompt.numel() == 0:
            raise TokenError("the prompt's token ids: the prompt is empty; give a prompt with some tokens")
        batch = check_tokens(model, prompt, where="the prompt's token ids", one_row=True)
        if batch.shape[0] != 1:
            raise TokenError(
                f"the prompt's token ids must be one row ([n_pos] or [1, n_pos]), got {batch.shape[0]} rows"
            )
        tokens, where = batch[0], "the prompt's token ids"
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    if tokens.numel() == 0 or (tokens.numel() == 1 and bos is not None and int(tokens[0]) == bos):
        raise TokenError(f"{where}: is empty (no token besides BOS); give a prompt with some text")
    return check_tokens(model, tokens, where=where, one_row=True)[0]


def text_rows(model: nn.Module, text: str, n_pos: int, *, where: str = "text") -> Int[Tensor, "n_rows n_pos"]:
    """Cut `text` into rows of `n_pos` tokens for evaluation: the model's tokenizer
    without special tokens, each row starting with the BOS token (when the tokenizer has
    one) followed by the next stream tokens; the tail that does not fill a row is dropped.
    Refuses a text shorter than one row."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise TokenError("this model has no tokenizer: give token ids instead of text")
    if not isinstance(n_pos, int) or n_pos < 2 or n_pos > model.cfg.n_ctx:
        raise TokenError(f"the row length must be between 2 and the model's context ({model.cfg.n_ctx}), got {n_pos}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    width = n_pos - (bos is not None)
    rows = [ids[i : i + width] for i in range(0, len(ids) - width + 1, width)]
    if not rows:
        raise TokenError(f"{where}: {len(ids)} tokens, fewer than one row of {width}; give more text or a shorter row")
    prefix = [bos] if bos is not None else []
    return check_tokens(model, torch.tensor([prefix + row for row in rows]), where=where, min_positions=2)
