"""On a CUDA GPU, the library gives the CPU's results: training (every activation on the
sparse path, AuxK, checkpoint and exact resume), splice and `evaluate_splice`,
`attribute` with `max_feature_nodes`, interventions and loading a file to the GPU.

Marked `cuda` and skipped where CUDA is absent (`scripts/gpu_check.sh` runs them on a
GPU machine). Tolerances: float32 on both devices, the GPU's TF32 matmuls off; sums in
another order give relative differences of about 1e-6, so values are compared with
rtol 1e-4 / atol 1e-5 (losses and CE with rtol 1e-4), and selected latents exactly.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, make_transcoder

from tl_transcoders import Transcoder, evaluate_splice, splice
from tl_transcoders.attribution import FeatureEdit, attribute, intervene
from tl_transcoders.hooks.models import tiny_random_model
from tl_transcoders.training import TrainConfig, Trainer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def exact_float32():
    """Full float32 matmuls on the GPU (no TF32), so CPU and GPU differ only by rounding."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def on(device: str, name: str = "bridge-llama"):
    """A copy of a test model on `device` (the cached CPU model stays where it is)."""
    import copy

    return copy.deepcopy(build_model(name)).to(device)


def batches(model, n: int = 6):
    for i in range(n):
        yield torch.randint(0, model.cfg.d_vocab, (4, 8), generator=torch.Generator().manual_seed(i))


def train(device: str, activation: str, output_dir, resume: bool = False, n_batches: int = 6):
    torch.manual_seed(0)
    model = tiny_random_model().to(device)
    cfg = TrainConfig(
        layers=[1, 2],
        activation=activation,
        k=4,
        expansion=2,
        batch_size=4,
        context_size=8,
        max_tokens=4 * 8 * 6,
        output_dir=str(output_dir),
        checkpoint_every=2,
        dead_tokens=8,
        resume=resume,
        l1_coefficient=1e-2,
    )
    trainer = Trainer(model, cfg)
    transcoders = trainer.fit(batches(model, n_batches))
    return trainer, transcoders


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu", "jumprelu"])
def test_training_on_the_gpu_equals_the_cpu(tmp_path, activation):
    cpu_trainer, cpu = train("cpu", activation, tmp_path / "cpu")
    gpu_trainer, gpu = train("cuda", activation, tmp_path / "gpu")
    assert all(p.is_cuda for t in gpu for p in t.parameters())
    assert all(count.is_cuda for count in gpu_trainer.since_fired.values())
    for a, b in zip(cpu, gpu):
        for name, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[name].cpu(), value, **TOLERANCE, msg=f"{activation} {name}")
    for a, b in zip(cpu_trainer.history, gpu_trainer.history):
        assert b["fvu"] == pytest.approx(a["fvu"], rel=1e-4)


def test_resume_on_the_gpu_is_exact(tmp_path):
    _, whole = train("cuda", "topk", tmp_path / "whole")
    train("cuda", "topk", tmp_path / "cut", n_batches=3)  # stops early: checkpoint at step 2
    _, resumed = train("cuda", "topk", tmp_path / "cut", resume=True)
    for a, b in zip(whole, resumed):
        for name, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[name]), name


@pytest.mark.parametrize("name", ["bridge-llama", "bridge-gpt2"])
def test_splice_and_evaluate_on_the_gpu_equal_the_cpu(name):
    cpu_model, gpu_model = build_model(name), on("cuda", name)
    transcoders = [make_transcoder(cpu_model, layer, seed=layer) for layer in (0, 2)]
    gpu_transcoders = [Transcoder.from_tensors(t.cfg, t.state_dict(), device="cuda") for t in transcoders]
    tokens = torch.randint(0, cpu_model.cfg.d_vocab, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), splice(cpu_model, transcoders):
        expected = cpu_model(tokens)
    with torch.no_grad(), splice(gpu_model, gpu_transcoders):
        torch.testing.assert_close(gpu_model(tokens.cuda()).cpu(), expected, **TOLERANCE)
    a = evaluate_splice(cpu_model, transcoders, tokens).to_dict()
    b = evaluate_splice(gpu_model, gpu_transcoders, tokens.cuda()).to_dict()
    for key in ("ce_clean", "ce_all_spliced", "kl_all_spliced"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    for layer, row in a["layers"].items():
        for key in ("ce_spliced", "fvu", "l0", "dead_fraction"):
            assert b["layers"][layer][key] == pytest.approx(row[key], rel=1e-4, abs=1e-6), (layer, key)


def test_attribution_and_interventions_on_the_gpu_equal_the_cpu():
    cpu_model, gpu_model = build_model("bridge-llama"), on("cuda")
    transcoders = [make_transcoder(cpu_model, layer, seed=layer) for layer in (0, 1, 2)]
    gpu_transcoders = [Transcoder.from_tensors(t.cfg, t.state_dict(), device="cuda") for t in transcoders]
    prompt = torch.randint(0, cpu_model.cfg.d_vocab, (10,), generator=torch.Generator().manual_seed(1))
    a = attribute(cpu_model, transcoders, prompt, max_feature_nodes=20, batch_size=8)
    b = attribute(gpu_model, gpu_transcoders, prompt.cuda(), max_feature_nodes=20, batch_size=8)
    assert torch.equal(a.features, b.features.cpu())
    torch.testing.assert_close(b.adjacency.cpu(), a.adjacency, **TOLERANCE)
    edit = [FeatureEdit(1, 4, 0, value=2.0)]
    x = intervene(cpu_model, transcoders, prompt, edit, constrained_layers=[0, 1, 2])
    y = intervene(gpu_model, gpu_transcoders, prompt.cuda(), edit, constrained_layers=[0, 1, 2])
    torch.testing.assert_close(y.change.cpu(), x.change, **TOLERANCE)


def test_a_saved_transcoder_loads_onto_the_gpu(tmp_path):
    model = build_model("bridge-gpt2")
    original = make_transcoder(model, 1)
    original.save(tmp_path)
    loaded = Transcoder.load(tmp_path, device="cuda")
    assert all(p.is_cuda for p in loaded.parameters()) and not loaded.training
    x = torch.randn(5, model.cfg.d_model)
    torch.testing.assert_close(loaded(x.cuda()).cpu(), original(x), **TOLERANCE)
