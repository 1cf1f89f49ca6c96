"""The sparsify side of benchmarks/train.py. NEEDS ITS OWN VIRTUALENV: run it with
.bench/venvs/sparsify/bin/python (made by `bash benchmarks/setup.sh`: torch==2.13.0, then
eai-sparsify==1.3.3; `$SPARSIFY_PYTHON` names another), never with the tl-transcoders
venv; benchmarks/train.py starts it as a subprocess.

Trains EleutherAI sparsify's (eai-sparsify 1.3.3) skip transcoders on the CPU with
`sparsify.Trainer` driven from Python (`python -m sparsify` hard-codes a CUDA device map),
on the HF model, the pre-tokenized batches written by train.py (same batches, same
order), with sparsify's defaults (signum + schedule-free, no AuxK) apart from what the
benchmark fixes (transcoder, skip, k, latents, batch, hookpoints, seed). sparsify logs
metrics only through wandb; a stub `wandb` module records the `wandb.log` calls.

Then evaluates the saved transcoder(s) (`sae.safetensors` + `cfg.json`, the optimizer's
averaged weights) on the held-out tokens: FVU of sparsify's forward
ReLU(x W^T + b) -> topk -> sum of W_dec rows + b_dec + x W_skip^T on the activations of
the HF model (input: the MLP's input, post-RMSNorm with its weight; output: the MLP's
output). Writes one JSON with the figures (`--out`).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from measure import fvu, peak_rss_mib, rss_mib


def install_wandb_stub() -> list:
    """A stand-in `wandb` module: sparsify computes its metrics only when wandb imports."""
    logged: list = []
    stub = types.ModuleType("wandb")
    stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    stub.init = lambda *args, **kwargs: None
    stub.log = lambda info, step=None, **kwargs: logged.append({"step": step, **info})
    stub.finish = lambda *args, **kwargs: None
    sys.modules["wandb"] = stub
    return logged


def capture_mlp(model, tokens: torch.Tensor, hookpoints: list[str], rows: int = 16) -> dict:
    """{hookpoint: (inputs, outputs)} of each MLP on `tokens`, flattened to [n, d]; runs
    the base model (no LM head) a few rows at a time."""
    base = model.base_model
    got: dict = {h: ([], []) for h in hookpoints}
    handles = []
    for h in hookpoints:

        def hook(module, inputs, output, h=h):
            got[h][0].append(inputs[0].reshape(-1, inputs[0].shape[-1]).float())
            got[h][1].append(output.reshape(-1, output.shape[-1]).float())

        handles.append(base.get_submodule(h).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for start in range(0, tokens.shape[0], rows):
                base(input_ids=tokens[start : start + rows])
    finally:
        for handle in handles:
            handle.remove()
    return {h: (torch.cat(x), torch.cat(y)) for h, (x, y) in got.items()}


def sparsify_forward(weights: dict, k: int, x: torch.Tensor) -> torch.Tensor:
    """sparsify's transcoder forward from its saved weights: ReLU encoder, top k, decoder
    rows summed, `b_dec` and the skip connection added."""
    pre = F.relu(F.linear(x, weights["encoder.weight"], weights["encoder.bias"]))
    values, indices = pre.topk(k, dim=-1, sorted=False)
    out = F.embedding_bag(indices, weights["W_dec"], per_sample_weights=values, mode="sum")
    out = out + weights["b_dec"]
    if "W_skip" in weights:
        out = out + x @ weights["W_skip"].T
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--tokens", required=True, help="[rows, context] int64 tensor file (torch.save)")
    parser.add_argument("--heldout", required=True)
    parser.add_argument("--layers", required=True, help="comma-separated layer numbers")
    parser.add_argument("--num-latents", type=int, required=True)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import datasets
    import sparsify
    from safetensors.torch import load_file
    from sparsify import SparseCoderConfig, TrainConfig, Trainer
    from transformers import AutoModelForCausalLM

    logged = install_wandb_stub()  # after the imports: accelerate probes wandb's spec
    torch.manual_seed(args.seed)
    rss_start = rss_mib()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tokens = torch.load(args.tokens)
    dataset = datasets.Dataset.from_dict({"input_ids": tokens.numpy()}).with_format("torch")
    layers = [int(s) for s in args.layers.split(",")]
    hookpoints = [f"layers.{layer}.mlp" for layer in layers]
    cfg = TrainConfig(
        SparseCoderConfig(
            transcode=True,
            skip_connection=True,
            k=args.k,
            num_latents=args.num_latents,
        ),
        batch_size=args.batch_size,
        hookpoints=list(hookpoints),
        init_seeds=[args.seed],
        save_dir=args.save_dir,
        run_name="run",
        log_to_wandb=True,
    )
    trainer = Trainer(cfg, dataset, model)
    rss_ready = rss_mib()
    n_tokens = (len(dataset) // args.batch_size) * args.batch_size * tokens.shape[1]
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit()
    wall = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    peak_train = peak_rss_mib()

    heldout = torch.load(args.heldout)
    acts = capture_mlp(model, heldout, hookpoints)
    per_layer = {}
    for layer, hook in zip(layers, hookpoints):
        path = Path(args.save_dir) / "run" / hook
        weights = load_file(str(path / "sae.safetensors"))
        saved_cfg = json.loads((path / "cfg.json").read_text())
        x, y = acts[hook]
        with torch.no_grad():
            y_hat = sparsify_forward(weights, saved_cfg["k"], x)
        n, ctx = heldout.shape
        no_bos = torch.ones(n, ctx, dtype=torch.bool)
        no_bos[:, 0] = False
        no_bos = no_bos.flatten()
        per_layer[layer] = {
            "fvu": fvu(y, y_hat),
            "fvu_excl_bos": fvu(y[no_bos], y_hat[no_bos]),
            "target_total_variance": (y.double() - y.double().mean(0)).pow(2).sum().item(),
            "num_latents": weights["W_dec"].shape[0],
            "k": saved_cfg["k"],
        }
    train_fvu = {}
    for entry in logged:
        for key, value in entry.items():
            if key.startswith("fvu/"):
                train_fvu.setdefault(key[4:], []).append((entry["step"], value))
    result = {
        "trainer": f"eai-sparsify {getattr(sparsify, '__version__', None) or '1.3.3'}",
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "layers": layers,
        "hookpoints": hookpoints,
        "tokens": n_tokens,
        "steps": trainer.global_step,
        "wall_s": wall,
        "cpu_s": cpu_s,
        "tokens_per_s": n_tokens / wall,
        "peak_rss_mib": peak_train,
        "rss_before_load_mib": rss_start,
        "rss_after_setup_mib": rss_ready,
        "peak_rss_incl_eval_mib": peak_rss_mib(),
        "torch_threads": torch.get_num_threads(),
        "heldout": per_layer,
        "train_fvu_last": {h: v[-1][1] for h, v in train_fvu.items()},
        "train_fvu_curve": {h: v[:: max(1, len(v) // 25)] for h, v in train_fvu.items()},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("train_fvu_curve",)}, indent=2))


if __name__ == "__main__":
    main()
