"""evaluate_splice: every number equals the same quantity computed separately."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_transcoder

from tl_transcoders import compute_ablation_baselines, evaluate_splice, splice
from tl_transcoders.hooks.sites import attach


def per_token_ce(model, batches, hooks=()):
    with torch.no_grad(), attach(model, list(hooks)):
        return torch.cat([model(b, return_type="loss", loss_per_token=True) for b in batches])


def mean_kl(model, batches, hooks):
    kls = []
    with torch.no_grad():
        for b in batches:
            clean = model(b).log_softmax(-1)
            with attach(model, list(hooks)):
                other = model(b).log_softmax(-1)
            kls.append((clean.exp() * (clean - other)).sum(-1))
    return torch.cat(kls).mean().item()


def captured(model, batches, site):
    values = []
    with torch.no_grad(), attach(model, [(site, lambda a: values.append(a.clone()))]):
        for b in batches:
            model(b)
    return torch.cat([v.reshape(-1, v.shape[-1]) for v in values])


@pytest.fixture
def batches(model):
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, model.cfg.d_vocab, (2, 10), generator=generator) for _ in range(2)]


def close(a, b):
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_report_equals_separate_computation(model, batches):
    transcoders = [make_transcoder(model, layer, seed=layer) for layer in (0, 2)]
    report = evaluate_splice(model, transcoders, batches)

    close(report.ce_clean, per_token_ce(model, batches).mean().item())
    with splice(model, transcoders):
        close(report.ce_all_spliced, per_token_ce(model, batches).mean().item())
    from tl_transcoders.hooks.splice import transcoder_hooks

    close(report.kl_all_spliced, mean_kl(model, batches, transcoder_hooks(transcoders)))
    for t in transcoders:
        layer, site = t.cfg.layer, t.cfg.output_site
        row = report.layers[layer]
        x, y = captured(model, batches, t.cfg.input_site), captured(model, batches, site)
        mean = y.mean(0)
        ce_spliced = per_token_ce(model, batches, transcoder_hooks([t])).mean().item()
        ce_zero = per_token_ce(model, batches, [(site, torch.zeros_like)]).mean().item()
        ce_mean = per_token_ce(model, batches, [(site, lambda a: mean.expand_as(a))]).mean().item()
        close(row.ce_spliced, ce_spliced)
        close(row.ce_zero_ablated, ce_zero)
        close(row.ce_mean_ablated, ce_mean)
        # CE recovered is ill-conditioned on random models (ablation barely matters),
        # so check its formula on the report's own CE values, each checked above.
        close(row.ce_recovered, (row.ce_zero_ablated - row.ce_spliced) / (row.ce_zero_ablated - report.ce_clean))
        close(row.kl, mean_kl(model, batches, transcoder_hooks([t])))
        with torch.no_grad():
            y_hat, latents = t(x), t.encode(x)
        close(row.fvu, ((y - y_hat) ** 2).sum().item() / ((y - mean) ** 2).sum().item())
        close(row.l0, (latents != 0).sum(-1).float().mean().item())
        close(row.dead_fraction, (latents != 0).sum(0).eq(0).float().mean().item())


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "batchtopk"])
def test_other_activations(model, batches, activation):
    transcoder = make_transcoder(model, 1, activation=activation)
    report = evaluate_splice(model, [transcoder], batches)
    x = captured(model, batches, transcoder.cfg.input_site)
    with torch.no_grad():
        close(report.layers[1].l0, (transcoder.encode(x) != 0).sum(-1).float().mean().item())
    with splice(model, [transcoder]):
        close(report.layers[1].ce_spliced, per_token_ce(model, batches).mean().item())


def test_reused_baselines_give_the_same_report(model, batches):
    transcoders = [make_transcoder(model, layer) for layer in range(3)]
    baselines = compute_ablation_baselines(model, batches, [0, 1, 2])
    reused = evaluate_splice(model, transcoders, batches, baselines=baselines).to_dict()
    assert_dicts_close(reused, evaluate_splice(model, transcoders, batches).to_dict())


def assert_dicts_close(a, b):
    """Reports agree on every number; CE recovered (ill-conditioned on random models)
    only through the CE values it is computed from."""
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, dict):
            assert_dicts_close(value, b[key])
        elif key != "ce_recovered":
            close(value, b[key])


def test_baselines_from_other_tokens_are_refused(model, batches):
    transcoder = make_transcoder(model, 1)
    baselines = compute_ablation_baselines(model, batches[:1], [1])
    with pytest.raises(ValueError, match="computed on other tokens"):
        evaluate_splice(model, [transcoder], batches, baselines=baselines)


def test_baselines_missing_a_site_are_refused(model, batches):
    baselines = compute_ablation_baselines(model, batches, [0])
    with pytest.raises(ValueError, match=r"do not cover site\(s\) \['blocks.1.hook_mlp_out'\]"):
        evaluate_splice(model, [make_transcoder(model, 1)], batches, baselines=baselines)


def test_report_shapes_and_json(model, batches):
    report = evaluate_splice(model, [make_transcoder(model, 1)], batches, keep_per_token=True)
    data = json.loads(json.dumps(report.to_dict()))
    estimates = {"ce_spliced", "ce_zero_ablated", "ce_mean_ablated", "ce_recovered", "ce_increase", "kl"}
    assert set(data["layers"]["1"]) == estimates | {f"{name}_se" for name in estimates} | {"fvu", "l0", "dead_fraction"}
    assert data["n_tokens"] == 4 * 9 and data["n_rows"] == 4
    assert report.per_row["clean"].shape == (4,)
    assert report.per_token["clean"].shape == (4, 9)
    assert report.per_token["layer1.mean_ablated"].shape == (4, 9)
    assert report.kl_per_token["layer1.spliced"].shape == (4, 10)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(10, dtype=torch.long), r"expected a \[batch, pos\] tensor"),
        (torch.zeros(2, 5), "token ids must be integers"),
        (torch.zeros(2, 1, dtype=torch.long), "at least 2 positions"),
        (torch.full((2, 5), 10_000), "must lie in"),
        ([torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long)], "use one sequence length"),
        (torch.zeros(1, 99, dtype=torch.long), "exceed the model's context"),
        ([], "no token batches"),
    ],
)
def test_bad_tokens(model, bad, message):
    with pytest.raises(ValueError, match=message):
        evaluate_splice(model, [make_transcoder(model, 0)], bad)


def test_one_transcoder_per_layer(model, batches):
    site = "blocks.1.ln2.hook_normalized"
    with pytest.raises(ValueError, match="at most one transcoder per layer"):
        evaluate_splice(
            model,
            [
                make_transcoder(model, 1),
                make_transcoder(model, 1, output_site=site, input_site="blocks.1.hook_resid_mid", skip=False),
            ],
            batches,
        )


def test_variants_do_not_rerun_the_early_blocks(model, batches):
    """Per-layer variants start after their layer: with transcoders on layers 1 and 2,
    block 0 runs only in the splice check pass and in the clean pass of each batch."""
    transcoders = [make_transcoder(model, layer) for layer in (1, 2)]
    calls = []
    handle = model.blocks[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        evaluate_splice(model, transcoders, batches, batch_size=2)
    finally:
        handle.remove()
    # check pass + one clean pass per batch + the re-run of batch 0 for mean ablation
    assert len(calls) == 1 + len(batches) + (len(batches) - 1)


def test_full_passes_when_resuming_does_not_reproduce(model, batches, monkeypatch):
    from tl_transcoders.evaluation import clean_pass, run

    transcoders = [make_transcoder(model, layer) for layer in (0, 2)]
    expected = evaluate_splice(model, transcoders, batches).to_dict()
    monkeypatch.setattr(run, "is_bridge", lambda m: True)
    monkeypatch.setattr(clean_pass, "check_resume", lambda *args: False)
    with pytest.warns(UserWarning, match="full forward pass"):
        fallback = evaluate_splice(model, transcoders, batches).to_dict()
    assert_dicts_close(fallback, expected)


def test_last_batch_may_be_smaller(model):
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 10), generator=torch.Generator().manual_seed(2))
    transcoder = make_transcoder(model, 1)
    split = evaluate_splice(model, [transcoder], list(tokens.split(2)), keep_per_token=True)
    assert split.per_token["clean"].shape == (3, 9)
    assert_dicts_close(split.to_dict(), evaluate_splice(model, [transcoder], tokens).to_dict())


def test_nan_transcoder_outputs_are_reported(model, batches):
    transcoder = make_transcoder(model, 1)
    with torch.no_grad():
        transcoder.W_skip.fill_(1e38)  # finite weights, overflowing outputs
    with pytest.raises(ValueError, match="produced NaN or inf outputs"):
        evaluate_splice(model, [transcoder], batches)


def test_kl_shortcut_is_kept_where_the_head_is_affine(model, batches):
    """KL through the unembedding's input (O(d_model) per token) must agree with the
    direct sum over the vocabulary and stay in use; logit soft-capping disables it."""
    from tl_transcoders.evaluation.clean_pass import CleanPass, head_input

    transcoder = make_transcoder(model, 1)
    sites = [transcoder.cfg.input_site, transcoder.cfg.output_site]
    with torch.no_grad():
        clean = CleanPass(model, batches[0], sites, [transcoder], resumable=True)
    with torch.no_grad(), head_input(model) as head:
        out = transcoder(clean.cache[transcoder.cfg.input_site])
        logits = clean.variant_logits(transcoder.cfg.output_site, out)
    with torch.no_grad():
        _, kl = clean.ce_and_kl_of(logits, head["x"])
        clean_logits = model(batches[0]).float()
    direct = (
        torch.linalg.vecdot(clean.probs, clean_logits - logits.float())
        + torch.logsumexp(logits.float(), -1)
        - clean.lse
    )
    assert torch.allclose(kl, direct.clamp_min(0), atol=1e-5)
    softcapped = (getattr(model.cfg, "output_logits_soft_cap", 0) or 0) > 0
    assert (clean.kl_direction is None) == softcapped


# --- streams, bounded memory, error bars ----------------------------------------------


def test_a_generator_of_batches_is_read_once(model):
    tokens = torch.randint(0, model.cfg.d_vocab, (5, 10), generator=torch.Generator().manual_seed(3))
    transcoder = make_transcoder(model, 1)
    reads = []

    def stream():
        for batch in tokens.split(2):
            reads.append(batch.shape[0])
            yield batch

    streamed = evaluate_splice(model, [transcoder], stream()).to_dict()
    assert reads == [2, 2, 1]
    assert_dicts_close(streamed, evaluate_splice(model, [transcoder], tokens).to_dict())
    baselines = compute_ablation_baselines(model, stream(), [1])
    assert_dicts_close(evaluate_splice(model, [transcoder], tokens, baselines=baselines).to_dict(), streamed)


def test_rows_are_split_into_batches_of_at_most_batch_size(model):
    tokens = torch.randint(0, model.cfg.d_vocab, (7, 10), generator=torch.Generator().manual_seed(4))
    transcoder = make_transcoder(model, 1)
    rows = []
    handle = model.blocks[0].register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        report = evaluate_splice(model, [transcoder], tokens, batch_size=3)
    finally:
        handle.remove()
    assert max(rows) == 3 and rows.count(1) >= 1  # 3 + 3 + 1 rows, beside the 1-row site check
    assert_dicts_close(report.to_dict(), evaluate_splice(model, [transcoder], tokens).to_dict())


def test_the_default_batch_keeps_one_copy_of_the_logits_within_the_budget(model):
    from tl_transcoders.evaluation import default_batch_size
    from tl_transcoders.evaluation.run import LOGITS_BUDGET_BYTES

    rows = default_batch_size(model, 128)
    assert rows * 128 * model.cfg.d_vocab * 4 <= LOGITS_BUDGET_BYTES < (rows + 1) * 128 * model.cfg.d_vocab * 4
    assert default_batch_size(model, 10**9) == 1


def test_the_fingerprint_does_not_depend_on_the_batching(model):
    tokens = torch.randint(0, model.cfg.d_vocab, (4, 10), generator=torch.Generator().manual_seed(5))
    baselines = compute_ablation_baselines(model, list(tokens.split(1)), [1])
    evaluate_splice(model, [make_transcoder(model, 1)], tokens, baselines=baselines, batch_size=3)


def test_error_bars_equal_a_direct_computation_over_rows(model):
    tokens = torch.randint(0, model.cfg.d_vocab, (6, 10), generator=torch.Generator().manual_seed(6))
    transcoder = make_transcoder(model, 1)
    report = evaluate_splice(model, [transcoder], tokens, batch_size=4, keep_per_token=True)
    clean = report.per_token["clean"].double().mean(1)
    spliced = report.per_token["layer1.spliced"].double().mean(1)
    zero = report.per_token["layer1.zero_ablated"].double().mean(1)
    kl = report.kl_per_token["layer1.spliced"].double().mean(1)
    n = clean.numel()

    def sem(values):
        return (values.std() / n**0.5).item()

    row = report.layers[1]
    close(report.ce_clean.se, sem(clean))
    close(row.ce_spliced.se, sem(spliced))
    close(row.ce_increase, (spliced - clean).mean().item())
    close(row.ce_increase.se, sem(spliced - clean))
    close(row.kl.se, sem(kl))
    ratio = (zero - spliced).mean() / (zero - clean).mean()
    close(row.ce_recovered, ratio.item())
    close(row.ce_recovered.se, sem((zero - spliced) - ratio * (zero - clean)) / abs((zero - clean).mean().item()))
    data = report.to_dict()
    assert data["ce_clean_se"] == report.ce_clean.se and data["layers"]["1"]["ce_recovered_se"] == row.ce_recovered.se
