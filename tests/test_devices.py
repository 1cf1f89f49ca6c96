"""Every tensor the library creates follows the model's device.

Without a GPU: each public operation runs under `device_check.FactoryCalls`, which
fails on any tensor factory call in the library that does not name a device (it failed
on the trainer's firing counters and on the evaluation's statistics before they were
fixed), and the trainer builds on a model on the `meta` device. With CUDA: the same
operations on the GPU give the CPU's results within a stated tolerance."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_PARAMS, build_model, make_transcoder
from device_check import FactoryCalls

from tl_transcoders import compute_ablation_baselines, evaluate_splice, splice
from tl_transcoders.analysis.autointerp import latent_activations
from tl_transcoders.analysis.dashboards import collect_activations
from tl_transcoders.analysis.probing import collect_features
from tl_transcoders.attribution import FeatureEdit, Node, attribute, find_paths, intervene, run_prompt
from tl_transcoders.hooks.models import tiny_random_model
from tl_transcoders.training import TrainConfig, Trainer

NAMES = ["ht-llama" if "ht-llama" in MODEL_PARAMS else "bridge_compat-llama", "bridge-gpt2"]


@pytest.fixture(params=NAMES)
def model(request):
    return build_model(request.param)


def operations(model, tmp_path):
    """One call of each public operation that makes tensors, on `model`'s device."""
    transcoders = [make_transcoder(model, layer, seed=layer) for layer in (0, 2)]
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 12), generator=torch.Generator().manual_seed(0))
    prompt = tokens[0]

    def train(activation):
        cfg = TrainConfig(
            layers=[0, 2],
            activation=activation,
            k=4,
            expansion=2,
            batch_size=4,
            context_size=8,
            max_tokens=4 * 8 * 3,
            output_dir=str(tmp_path / activation),
            checkpoint_every=2,
            eval_every=2,  # the in-training evaluator makes tensors too
            dead_tokens=8,
            shuffle_buffer=1,
        )
        batches = (
            torch.randint(0, model.cfg.d_vocab, (4, 8), generator=torch.Generator().manual_seed(i)) for i in range(9)
        )
        Trainer(model, cfg).fit(batches, eval_tokens=tokens)

    return {
        "train topk": lambda: train("topk"),
        "train batchtopk": lambda: train("batchtopk"),
        "train relu": lambda: train("relu"),
        "train jumprelu": lambda: train("jumprelu"),
        "evaluate_splice": lambda: evaluate_splice(model, transcoders, tokens, batch_size=2),
        "compute_ablation_baselines": lambda: compute_ablation_baselines(model, tokens, [0, 2]),
        "splice": lambda: _spliced_forward(model, transcoders, tokens),
        "attribute": lambda: attribute(model, transcoders, prompt, max_feature_nodes=5, batch_size=4),
        "intervene": lambda: intervene(
            model, transcoders, prompt, [FeatureEdit(0, 3, 0, value=1.0)], constrained_layers=[0, 1, 2]
        ),
        "run_prompt and find_paths": lambda: find_paths(
            run_prompt(model, transcoders, prompt), Node("logit", 11, index=5)
        ),
        "collect_activations": lambda: collect_activations(model, transcoders[0], tokens, n_top=3),
        "latent_activations": lambda: latent_activations(model, transcoders[0], tokens, [0, 1]),
        "collect_features": lambda: collect_features(model, tokens, {"tc": transcoders[0]}),
    }


def _spliced_forward(model, transcoders, tokens):
    with torch.no_grad(), splice(model, transcoders):
        model(tokens)


def test_no_library_tensor_is_made_without_a_device(model, tmp_path):
    undeviced = {}
    for name, operation in operations(model, tmp_path).items():
        with FactoryCalls() as recorder:
            operation()
        if recorder.calls:
            undeviced[name] = sorted(set(recorder.calls))
    assert undeviced == {}, f"tensors made without a device: {undeviced}"


def test_the_trainer_builds_on_the_models_device(tmp_path):
    meta = tiny_random_model().to("meta")
    cfg = TrainConfig(layers=[1, 2], k=4, expansion=2, batch_size=4, context_size=8, output_dir=str(tmp_path))
    trainer = Trainer(meta, cfg)
    tensors = [p for t in trainer.transcoders.values() for p in t.parameters()] + list(trainer.since_fired.values())
    assert {t.device.type for t in tensors} == {"meta"}
