"""The GPU check's benchmark (`scripts/gpu_check.sh` runs it after the `cuda` tests).

On one CUDA device, with random models shaped like SmolLM2-135M (no weights to carry):

  training     B1-shaped: layer 6, skip transcoder, TopK k 32, 16x (9,216 latents),
               batches of 32 x 128 random tokens; the model in bf16, the transcoder in
               fp32. `Trainer.fit` end to end (set-up excluded, saving included) against
               the forward pass alone to the trained layer (`stop_at_layer=7`) on the same
               batches, in the same run. Target: >= 0.8 of the forward-only tokens/s.
  attribution  `attribute` on a 64-token prompt with 30 random ReLU skip transcoders of
               4,096 latents (encoder biases set so that about 2% fire), fp32 model,
               `max_feature_nodes` 4,096. Target: <= 2 s.
  splice eval  `evaluate_splice` with 30 TopK transcoders on 8 x 128 tokens, fp32, in
               clean-forward units against its floor (benchmarks/splice_eval.py).

Timings synchronise the device. TF32 is off except where noted. Run:
    python benchmarks/gpu.py [--device cuda] [--quick]
Writes benchmarks/results/gpu_check.json (or --out). `--device cpu --quick` runs the
same code on a CPU in a minute, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from measure import RESULTS, git_state, machine_info
from splice_eval import build_transcoders, report_cost

from tl_transcoders import Transcoder, TranscoderConfig
from tl_transcoders.attribution import attribute
from tl_transcoders.hooks.models import SMOLLM2_SHAPE, random_model
from tl_transcoders.training import TrainConfig, Trainer

TRAIN_LAYER, TRAIN_TARGET, ATTRIBUTION_TARGET_S = 6, 0.8, 2.0


class DeviceTimer:
    """Median wall time of calls, the device synchronised before and after each."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn, repeats: int = 1) -> tuple[float, object]:
        times, result = [], None
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            result = fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times), result


def model_of(device: torch.device, dtype: torch.dtype, n_layers: int):
    shape = dict(SMOLLM2_SHAPE, n_layers=n_layers, dtype=dtype)
    return random_model(shape, bridge=False, device=device).eval()


def training(device: torch.device, timer: DeviceTimer, n_steps: int, n_layers: int) -> dict:
    model = model_of(device, torch.bfloat16, n_layers)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.cfg.d_vocab, (32, 128), generator=generator).to(device) for _ in range(n_steps)]
    tokens = n_steps * 32 * 128
    with torch.no_grad():
        model(batches[0], stop_at_layer=TRAIN_LAYER + 1)  # warm-up
        forward_s, _ = timer(lambda: [model(b, stop_at_layer=TRAIN_LAYER + 1) for b in batches])
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            layers=[TRAIN_LAYER],
            k=32,
            expansion=16,
            skip=True,
            batch_size=32,
            context_size=128,
            max_tokens=tokens,
            output_dir=tmp,
            checkpoint_every=10**9,
            log_every=10**9,
        )
        Trainer(model, TrainConfig(**{**cfg.to_dict(), "max_tokens": 4 * 32 * 128, "output_dir": tmp + "/warm"})).fit(
            iter(batches[:4])
        )  # warm-up: kernels compiled and cached
        trainer = Trainer(model, cfg)
        train_s, _ = timer(lambda: trainer.fit(iter(batches)))
    ratio = forward_s / train_s
    return {
        "steps": n_steps,
        "tokens": tokens,
        "model_dtype": "bfloat16",
        "transcoder_dtype": "float32",
        "train_seconds": train_s,
        "forward_seconds": forward_s,
        "train_tokens_per_s": tokens / train_s,
        "forward_tokens_per_s": tokens / forward_s,
        "fraction_of_forward": ratio,
        "final_fvu": trainer.history[-1]["fvu"],
        "target": TRAIN_TARGET,
        "meets_target": ratio >= TRAIN_TARGET,
    }


def relu_transcoders(model, d_latent: int, firing: float) -> list[Transcoder]:
    """Random ReLU skip transcoders whose encoder biases make about `firing` of the latents
    fire on random tokens."""
    device = next(model.parameters()).device
    tokens = torch.randint(0, model.cfg.d_vocab, (4, 128), generator=torch.Generator().manual_seed(1)).to(device)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        (f"blocks.{layer}.ln2.hook_normalized", lambda a, hook, layer=layer: inputs.__setitem__(layer, a))
        for layer in range(model.cfg.n_layers)
    ]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(tokens)
    transcoders = []
    for layer in range(model.cfg.n_layers):
        cfg = TranscoderConfig(
            d_in=model.cfg.d_model,
            d_out=model.cfg.d_model,
            d_latent=d_latent,
            layer=layer,
            activation="relu",
            skip=True,
            input_space="unfolded_ln",
        )
        transcoder = Transcoder(cfg, device=device)
        with torch.no_grad():
            transcoder.W_skip.normal_().mul_(0.01)
            x = inputs[layer].reshape(-1, model.cfg.d_model).float()
            pre = x @ transcoder.W_enc.T
            transcoder.b_enc.copy_(-pre.quantile(1 - firing, dim=0))
        transcoders.append(transcoder.eval())
    return transcoders


def attribution(device: torch.device, timer: DeviceTimer, n_pos: int, max_features: int, n_layers: int) -> dict:
    model = model_of(device, torch.float32, n_layers)
    transcoders = relu_transcoders(model, 4096, 0.02)
    prompt = torch.randint(0, model.cfg.d_vocab, (n_pos,), generator=torch.Generator().manual_seed(2)).to(device)
    attribute(model, transcoders, prompt[:8], max_feature_nodes=64)  # warm-up
    seconds, graph = timer(lambda: attribute(model, transcoders, prompt, max_feature_nodes=max_features), 2)
    return {
        "n_pos": n_pos,
        "max_feature_nodes": max_features,
        "n_active_features": graph.metadata["n_active_features"],
        "seconds": seconds,
        "target_seconds": ATTRIBUTION_TARGET_S,
        "meets_target": seconds <= ATTRIBUTION_TARGET_S,
    }


def splice_eval(device: torch.device, timer: DeviceTimer, n_layers: int) -> dict:
    model = model_of(device, torch.float32, n_layers)
    torch.manual_seed(0)
    transcoders = build_transcoders(model)
    tokens = torch.randint(0, model.cfg.d_vocab, (8, 128), generator=torch.Generator().manual_seed(3)).to(device)
    return report_cost(model, transcoders, tokens, timer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a few steps and layers: checks the script, not the speed")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --quick to check the script itself")
    torch.backends.cuda.matmul.allow_tf32 = False
    timer = DeviceTimer(device)
    n_layers = 8 if args.quick else 30
    started = time.perf_counter()
    result = {
        "benchmark": "gpu_check",
        "device": str(device),
        "quick": args.quick,
        "machine": machine_info(),
        "git": git_state(),
    }
    result["training"] = training(device, timer, n_steps=6 if args.quick else 60, n_layers=n_layers)
    print(
        f"training: {result['training']['train_tokens_per_s']:.0f} tokens/s, "
        f"{result['training']['fraction_of_forward']:.2f} of the forward pass alone (target >= {TRAIN_TARGET})",
        flush=True,
    )
    n_pos, max_features = (16, 256) if args.quick else (64, 4096)
    result["attribution"] = attribution(device, timer, n_pos, max_features, n_layers)
    print(
        f"attribution: {result['attribution']['seconds']:.2f} s at {result['attribution']['n_pos']} tokens x "
        f"{result['attribution']['max_feature_nodes']} features (target <= {ATTRIBUTION_TARGET_S} s)",
        flush=True,
    )
    result["splice_eval"] = splice_eval(device, timer, n_layers)
    print(
        f"splice eval: full report {result['splice_eval']['full_report']['units']:.1f} clean-forward units, "
        f"{result['splice_eval']['full_report']['ratio_to_floor']:.3f} of its floor",
        flush=True,
    )
    result["wall_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
