"""Mixed precision on the CPU: a bfloat16 model with float32 transcoders trains, splices,
evaluates and attributes; bfloat16 arithmetic with float32 weights (`compute_dtype`)
trains like float32; and the figures stay close to the float32 model's on the same data."""

from __future__ import annotations

import copy

import pytest
import torch

from tl_transcoders import evaluate_splice, splice
from tl_transcoders.attribution import attribute
from tl_transcoders.hooks.models import tiny_random_model
from tl_transcoders.training import TrainConfig, Trainer


@pytest.fixture(scope="module")
def models():
    """The tiny model in float32 and a bfloat16 copy of the same weights."""
    fp32 = tiny_random_model()
    return fp32, copy.deepcopy(fp32).to(torch.bfloat16)


def batches(model, n=40):
    for i in range(n):
        yield torch.randint(0, model.cfg.d_vocab, (8, 32), generator=torch.Generator().manual_seed(i))


def config(tmp_path, **options):
    fields = dict(
        layers=[1],
        k=8,
        expansion=4,
        batch_size=8,
        context_size=32,
        max_tokens=8 * 32 * 40,
        output_dir=str(tmp_path),
        log_every=10,
        lr=3e-3,
    )
    return TrainConfig(**{**fields, **options})


def test_a_bfloat16_model_trains_float32_transcoders(models, tmp_path):
    _, bf16 = models
    trainer = Trainer(bf16, config(tmp_path))
    (transcoder,) = trainer.fit(batches(bf16))
    assert transcoder.W_enc.dtype == torch.float32
    fvus = [h["fvu"] for h in trainer.history]
    assert fvus[-1] < fvus[0] - 0.02, fvus


def test_bfloat16_arithmetic_keeps_float32_weights_and_trains_like_float32(models, tmp_path):
    fp32, _ = models
    full = Trainer(fp32, config(tmp_path / "fp32"))
    full.fit(batches(fp32))
    mixed = Trainer(fp32, config(tmp_path / "mixed", compute_dtype="bfloat16"))
    mixed.fit(batches(fp32))
    params = [p for t in mixed.transcoders.values() for p in t.parameters()]
    assert {p.dtype for p in params} == {torch.float32}
    assert {s.dtype for state in mixed.optimizer.state.values() for s in state.values() if s.is_floating_point()} == {
        torch.float32
    }
    assert mixed.history[-1]["fvu"] == pytest.approx(full.history[-1]["fvu"], abs=0.03)


def test_splice_evaluate_and_attribute_on_a_bfloat16_model(models, tmp_path):
    fp32, bf16 = models
    (transcoder,) = Trainer(fp32, config(tmp_path, max_tokens=8 * 32 * 10)).fit(batches(fp32, 10))
    tokens = torch.randint(0, fp32.cfg.d_vocab, (6, 32), generator=torch.Generator().manual_seed(99))
    with torch.no_grad(), splice(bf16, [transcoder]):
        logits = bf16(tokens)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    exact, approximate = evaluate_splice(fp32, [transcoder], tokens), evaluate_splice(bf16, [transcoder], tokens)
    # bfloat16 keeps 8 bits of mantissa: CE within a few hundredths of a nat, FVU within a few percent
    assert approximate.ce_clean == pytest.approx(exact.ce_clean, abs=0.05)
    assert approximate.layers[1].ce_spliced == pytest.approx(exact.layers[1].ce_spliced, abs=0.05)
    assert approximate.layers[1].fvu == pytest.approx(exact.layers[1].fvu, rel=0.05, abs=0.01)
    graph = attribute(bf16, [transcoder], tokens[0, :12], max_feature_nodes=10)
    assert graph.adjacency.dtype == torch.float32 and torch.isfinite(graph.adjacency).all()
