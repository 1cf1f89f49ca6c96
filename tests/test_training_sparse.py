"""core.kernels: fused TopK / BatchTopK encoders and the sparse decoder against dense
autograd (values, indices and every gradient) and against `Transcoder`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tl_transcoders import Transcoder, TranscoderConfig, activations
from tl_transcoders.core import kernels as sparse
from tl_transcoders.core.activations import SparseLatents
from tl_transcoders.core.kernels import batchtopk_encode, sparse_decode, topk_encode

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def assert_close(actual, expected, **kwargs):
    """`torch.testing.assert_close` with the absolute tolerance scaled by the size of
    `expected` (float32 sums in another order differ by rounding relative to the
    largest term, not to each element)."""
    tol = TOL[expected.dtype]
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, **kwargs)


def make_problem(n, d_in, d_latent, d_out, dtype, seed=0, bias=0.0, batch=None):
    """Random inputs, weights and a regression target. `bias` shifts `b_enc` (a very
    negative one makes kept pre-activations negative, so the ReLU clips them)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if batch is None else batch

    def randn(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=g, dtype=torch.float64)).to(dtype)

    return dict(
        x=randn(*shape, d_in),
        W_enc=randn(d_latent, d_in, scale=d_in**-0.5),
        b_enc=randn(d_latent, scale=0.3) + bias,
        W_dec=randn(d_latent, d_out),
        b_dec=randn(d_out),
        y=randn(*shape, d_out),
    )


NAMES = ("x", "W_enc", "b_enc", "W_dec", "b_dec")


def leaves(p):
    return {name: p[name].clone().requires_grad_() for name in NAMES}


def dense_topk_latents(x, W_enc, b_enc, k):
    pre = F.linear(x, W_enc, b_enc)
    values, indices = torch.topk(pre, k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))


def dense_batchtopk_latents(x, W_enc, b_enc, k):
    return activations.batchtopk(F.linear(x, W_enc, b_enc), k)


def check_against_dense(p, k, fused_encode, dense_latents):
    """Loss through fused encode + sparse_decode vs the dense reference: equal loss,
    equal latents and equal gradients for x and every parameter."""
    a, b = leaves(p), leaves(p)
    values, indices = fused_encode(a["x"], a["W_enc"], a["b_enc"], k)
    out = sparse_decode(values, indices, a["W_dec"], a["b_dec"])
    loss_fused = ((out - p["y"]) ** 2).sum()
    loss_fused.backward()

    latents = dense_latents(b["x"], b["W_enc"], b["b_enc"], k)
    loss_dense = ((latents @ b["W_dec"] + b["b_dec"] - p["y"]) ** 2).sum()
    loss_dense.backward()

    d_latent = p["W_enc"].shape[0]
    assert_close(SparseLatents(values, indices).to_dense(d_latent), latents)
    assert_close(loss_fused, loss_dense)
    for name in NAMES:
        assert_close(a[name].grad, b[name].grad, msg=lambda m: f"{name}: {m}")
    return values.detach(), indices


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "n, d_in, d_latent, d_out, k",
    [
        (37, 16, 64, 12, 8),  # a generic case
        (200, 8, 12, 6, 5),  # far more tokens than latents: every latent kept by many tokens
        (5, 6, 30, 7, 1),  # k = 1
        (9, 5, 10, 4, 10),  # k = d_latent: every latent kept
    ],
)
def test_topk_gradients_match_dense(dtype, n, d_in, d_latent, d_out, k):
    p = make_problem(n, d_in, d_latent, d_out, dtype)
    _, indices = check_against_dense(p, k, topk_encode, dense_topk_latents)
    assert indices.shape == (n, k)
    if n * k > d_latent:  # the backward pass must sum over tokens sharing a latent
        assert torch.bincount(indices.flatten()).max() > 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_topk_relu_clipping(dtype):
    """Kept latents with negative pre-activations are zero and pass no gradient."""
    p = make_problem(40, 16, 48, 10, dtype, bias=-2.0)
    pre = F.linear(p["x"], p["W_enc"], p["b_enc"])
    kept = torch.topk(pre, 6, dim=-1).values
    assert (kept < 0).any() and (kept > 0).any()
    values, _ = check_against_dense(p, 6, topk_encode, dense_topk_latents)
    assert (values == 0).sum() == (kept <= 0).sum()


def test_topk_leading_batch_dims_and_chunks(monkeypatch):
    """[*batch, d_in] inputs; pre-activations computed in several blocks (the last
    one partial) give the same result as one block."""
    p = make_problem(0, 10, 40, 6, torch.float64, batch=(3, 7))
    whole = topk_encode(p["x"], p["W_enc"], p["b_enc"], 5)
    monkeypatch.setattr(sparse, "_CHUNK_ELEMENTS", 4 * 40)  # blocks of 4 of the 21 tokens
    check_against_dense(p, 5, topk_encode, dense_topk_latents)
    blocks = topk_encode(p["x"], p["W_enc"], p["b_enc"], 5)
    assert blocks.values.shape == blocks.indices.shape == (3, 7, 5)
    assert_close(blocks.to_dense(40), whole.to_dense(40))


def test_only_requested_gradients_and_nothing_dense_saved():
    """x without requires_grad (training on recorded activations) gets no gradient, and
    no [N, d_latent] tensor is kept for the backward pass."""
    n, d_latent = 64, 96
    p = make_problem(n, 12, d_latent, 8, torch.float32)
    W_enc = p["W_enc"].clone().requires_grad_()
    b_enc = p["b_enc"].clone().requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        values, indices = topk_encode(p["x"], W_enc, b_enc, 4)
    assert saved and max(saved) < n * d_latent
    values.sum().backward()
    assert W_enc.grad is not None and b_enc.grad is not None
    assert not indices.requires_grad and indices.dtype == torch.long
    expected_b = torch.zeros(d_latent).index_add_(0, indices.flatten(), (values > 0).float().flatten())
    torch.testing.assert_close(b_enc.grad, expected_b)


def test_gradcheck():
    p = make_problem(6, 5, 16, 4, torch.float64, bias=-0.2)
    inputs = [p[name].clone().requires_grad_() for name in NAMES]

    def fn(x, W_enc, b_enc, W_dec, b_dec):
        values, indices = topk_encode(x, W_enc, b_enc, 3)
        return sparse_decode(values, indices, W_dec, b_dec)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_forward_matches_the_dense_definition(activation, skip):
    """`Transcoder.run` (the sparse kernels in training mode) selects exactly the latents
    of the dense definition; values and output agree within float32's tolerance (another
    summation order differs in the last bits on some CPUs)."""
    torch.manual_seed(0)
    cfg = TranscoderConfig(d_in=12, d_out=10, d_latent=40, layer=1, activation=activation, k=5, skip=skip)
    t = Transcoder(cfg).train()
    with torch.no_grad():
        t.b_enc.normal_(0, 0.3)
        t.b_dec.normal_()
        if skip:
            t.W_skip.normal_()
    x = torch.randn(4, 6, 12)
    with torch.no_grad():
        pre = F.linear(x, t.W_enc, t.b_enc)
        reference = activations.topk(pre, 5).to_dense(40) if activation == "topk" else activations.batchtopk(pre, 5)
        out = t.run(x)
    latents = out.latents.to_dense(40)
    assert torch.equal(latents != 0, reference != 0)
    torch.testing.assert_close(latents, reference)
    expected = reference @ t.W_dec + t.b_dec + (x @ t.W_skip.T if skip else 0)
    torch.testing.assert_close(out.output, expected.detach())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "n, d_latent, k, bias, scale_first",
    [
        (30, 48, 4, 0.0, 1.0),  # a generic batch
        (30, 48, 4, 0.0, 6.0),  # token 0 keeps more than 2k latents: searched in full
        (20, 24, 6, -1.5, 1.0),  # fewer positive pre-activations than the budget
        (3, 10, 5, 0.0, 1.0),  # budget k * n larger than 2k per token
    ],
)
def test_batchtopk_gradients_match_dense(dtype, n, d_latent, k, bias, scale_first):
    p = make_problem(n, 10, d_latent, 6, dtype, seed=1, bias=bias)
    p["x"][0] *= scale_first
    values, indices = check_against_dense(p, k, batchtopk_encode, dense_batchtopk_latents)
    pre = F.linear(p["x"], p["W_enc"], p["b_enc"])
    assert (values > 0).sum() == min((pre > 0).sum(), k * n)
    kept = values > 0
    assert kept.sum(-1).max() == values.shape[-1] or bias < 0  # rows padded to the fullest one
    if scale_first > 1:
        assert kept[0].sum() > 2 * k
    # Distinct indices per row: padding uses latents the token did not keep.
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()
    assert indices.min() >= 0 and indices.max() < d_latent


def test_batchtopk_leading_batch_dims():
    p = make_problem(0, 8, 32, 5, torch.float64, batch=(2, 9))
    check_against_dense(p, 3, batchtopk_encode, dense_batchtopk_latents)


def test_pad_rows_fills_with_unkept_latents():
    tokens = torch.tensor([0, 0, 0, 2])
    latents = torch.tensor([0, 1, 5, 3])
    values, indices = sparse._pad_rows(tokens, latents, torch.tensor([1.0, 2.0, 3.0, 4.0]), 3, 7)
    assert torch.equal(values, torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [4.0, 0.0, 0.0]]))
    assert torch.equal(indices, torch.tensor([[0, 1, 5], [0, 1, 2], [3, 0, 1]]))


def test_bad_arguments():
    p = make_problem(4, 6, 8, 3, torch.float32)
    with pytest.raises(ValueError, match="k must be"):
        topk_encode(p["x"], p["W_enc"], p["b_enc"], 9)
    with pytest.raises(ValueError, match="k must be"):
        batchtopk_encode(p["x"], p["W_enc"], p["b_enc"], 0)
    with pytest.raises(TypeError, match="dtype"):
        topk_encode(p["x"].double(), p["W_enc"], p["b_enc"], 2)
