"""Token input is checked once, where it enters, with the same clear `TokenError` at
every entry point; text is refused, never truncated; token sets stream in batches."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_PARAMS, build_model, make_transcoder

from tl_transcoders import compute_ablation_baselines, evaluate_splice
from tl_transcoders.analysis.autointerp import latent_activations
from tl_transcoders.analysis.dashboards import collect_activations
from tl_transcoders.analysis.probing import collect_features
from tl_transcoders.attribution import attribute, intervene, run_prompt, zero
from tl_transcoders.core.errors import TranscodersError
from tl_transcoders.hooks.tokens import TokenError, check_tokens, prompt_tokens, text_rows, token_batches_of

BAD_TOKEN_SETS = [
    (lambda m: torch.zeros(2, 3, 5, dtype=torch.long), r"expected a \[batch, pos\] tensor"),
    (lambda m: torch.zeros(2, 5), "token ids must be integers"),
    (lambda m: torch.zeros(2, 5, dtype=torch.bool), "token ids must be integers"),
    (lambda m: torch.zeros(0, 5, dtype=torch.long), "has no rows"),
    (lambda m: torch.full((2, 5), m.cfg.d_vocab), r"must lie in \[0, 50\).*another model's tokenizer"),
    (lambda m: torch.full((2, 5), -1), r"must lie in \[0, 50\)"),
    (lambda m: torch.zeros(1, m.cfg.n_ctx + 1, dtype=torch.long), "exceed the model's context of 32 tokens"),
    (lambda m: "some text", "expected token ids"),
    (lambda m: 3.5, "expected token ids"),
]


# one HookedTransformer (where TransformerLens has it) and one Bridge
NAMES = ["ht-llama" if "ht-llama" in MODEL_PARAMS else "bridge_compat-llama", "bridge-gpt2"]


@pytest.fixture(params=NAMES)
def small_model(request):
    return build_model(request.param)


def entry_points(model):
    """Every function that takes a token set, called on `tokens`."""
    transcoder = make_transcoder(model, 1)
    return {
        "evaluate_splice": lambda tokens: evaluate_splice(model, [transcoder], tokens),
        "compute_ablation_baselines": lambda tokens: compute_ablation_baselines(model, tokens, [1]),
        "collect_activations": lambda tokens: collect_activations(model, transcoder, tokens),
        "latent_activations": lambda tokens: latent_activations(model, transcoder, tokens, [0, 1]),
        "collect_features": lambda tokens: collect_features(model, tokens, {"tc": transcoder}),
    }


@pytest.mark.parametrize("bad, message", BAD_TOKEN_SETS)
def test_every_token_set_entry_point_refuses_bad_tokens_alike(small_model, bad, message):
    for call in entry_points(small_model).values():
        with pytest.raises(TokenError, match=message):
            call(bad(small_model))


BAD_PROMPTS = [
    (torch.zeros(1, 2, 5, dtype=torch.long), r"expected a \[batch, pos\] tensor"),
    (torch.zeros(5), "token ids must be integers"),
    (torch.full((5,), 50), r"must lie in \[0, 50\)"),
    (torch.zeros(33, dtype=torch.long), "exceed the model's context of 32 tokens"),
    (torch.zeros(2, 5, dtype=torch.long), "must be one row"),
    (torch.zeros(0, dtype=torch.long), "is empty"),
    ("text for a model without a tokenizer", "has no tokenizer"),
]


@pytest.mark.parametrize("bad, message", BAD_PROMPTS)
def test_prompts_are_checked_alike(small_model, bad, message):
    transcoder = make_transcoder(small_model, 1)
    for call in (
        lambda t: attribute(small_model, [transcoder], t),
        lambda t: intervene(small_model, [transcoder], t, [zero(1, 0, 0)]),
        lambda t: run_prompt(small_model, [transcoder], t),
    ):
        with pytest.raises(TokenError, match=message):
            call(bad)


def test_a_token_error_is_a_library_error_and_a_value_error(small_model):
    with pytest.raises(TranscodersError):
        check_tokens(small_model, torch.zeros(2, 5))
    with pytest.raises(ValueError):
        check_tokens(small_model, torch.zeros(2, 5))


def test_rows_need_two_positions_to_be_evaluated(small_model):
    with pytest.raises(TokenError, match="at least 2 positions"):
        evaluate_splice(small_model, [make_transcoder(small_model, 1)], torch.zeros(2, 1, dtype=torch.long))


def test_a_vector_is_one_prompt_but_not_a_token_set(small_model):
    row = torch.randint(0, 50, (7,), dtype=torch.int32)
    assert torch.equal(prompt_tokens(small_model, row), row.long())
    assert check_tokens(small_model, row, one_row=True).shape == (1, 7)
    with pytest.raises(TokenError, match=r"got shape \(7,\); for one row of tokens pass tokens\[None\]"):
        check_tokens(small_model, row)


def test_batches_are_split_and_streamed_in_one_pass(small_model):
    produced = []

    def generator():
        for i in range(3):
            produced.append(i)
            yield torch.randint(0, 50, (5, 6), generator=torch.Generator().manual_seed(i))

    batches = token_batches_of(small_model, generator(), 2)
    first = next(batches)
    assert first.shape == (2, 6) and produced == [0], "the stream is read lazily"
    assert [b.shape[0] for b in [first, *batches]] == [2] * 7 + [1]  # 15 rows, parts of 5 split and joined


def test_a_stream_of_single_rows_is_gathered_into_batches(small_model):
    rows = (torch.randint(0, 50, (6,), generator=torch.Generator().manual_seed(i)) for i in range(7))
    batches = list(token_batches_of(small_model, rows, 3))
    assert [b.shape for b in batches] == [(3, 6), (3, 6), (1, 6)]


def test_mappings_with_input_ids_are_token_batches(small_model):
    rows = [{"input_ids": torch.randint(0, 50, (3, 6))}, {"input_ids": [[1, 2, 3, 4, 5, 6]]}]
    assert [b.shape for b in token_batches_of(small_model, rows, 8)] == [(4, 6)]
    with pytest.raises(TokenError, match="without 'input_ids'"):
        list(token_batches_of(small_model, [{"text": "a"}], 8))


def test_batches_of_different_lengths_are_refused_naming_the_batch(small_model):
    with pytest.raises(TokenError, match="token batch 1: has 6 positions but the first batch has 5"):
        list(
            token_batches_of(small_model, [torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long)], 4)
        )


def test_an_empty_token_set_is_refused(small_model):
    with pytest.raises(TokenError, match="no token batches"):
        list(token_batches_of(small_model, iter([]), 4))
    with pytest.raises(TokenError, match="batch_size must be a positive integer"):
        list(token_batches_of(small_model, torch.zeros(2, 5, dtype=torch.long), 0))


def test_text_prompts_are_refused_when_too_long_never_truncated():
    model = build_model("bridge-sandwich")  # has a word-level tokenizer
    long_prompt = " ".join(f"w{i % 40}" for i in range(model.cfg.n_ctx + 5))
    with pytest.raises(TokenError, match=r"the prompt: \d+ positions exceed the model's context of 32"):
        prompt_tokens(model, long_prompt)
    assert prompt_tokens(model, "w1 w2 w3").shape == (4,)  # BOS + 3 words
    with pytest.raises(TokenError, match="is empty"):
        prompt_tokens(model, "")
    with pytest.raises(TokenError, match="is empty"):
        attribute(model, [make_transcoder(model, 1)], "")


def test_text_rows_start_with_bos_and_refuse_too_little_text():
    model = build_model("bridge-sandwich")
    rows = text_rows(model, " ".join(f"w{i}" for i in range(20)), 8)
    assert rows.shape == (2, 8) and (rows[:, 0] == model.tokenizer.bos_token_id).all()
    with pytest.raises(TokenError, match="fewer than one row"):
        text_rows(model, "w1 w2", 8)
    with pytest.raises(TokenError, match="row length must be between 2"):
        text_rows(model, "w1 w2", 99)


def test_not_a_model_is_refused_clearly():
    with pytest.raises(TranscodersError, match="expected a TransformerLens HookedTransformer or TransformerBridge"):
        check_tokens(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long))
