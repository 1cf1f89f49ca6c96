"""Check the seed paper's claims on your own model: SAE vs transcoder vs skip transcoder.

"Transcoders Beat Sparse Autoencoders for Interpretability" (Paulo, Shabalin, Belrose)
claims (1) transcoder latents are more interpretable than SAE latents trained on the
same model and data, and (2) skip transcoders reconstruct better with no loss of
interpretability. This script trains, from one shared forward pass per batch and for
each chosen layer, an SAE on the MLP output, a transcoder (MLP input -> output) and a
skip transcoder, with equal width, k and tokens, then measures on held-out text:

- reconstruction and splice: FVU, CE / KL spliced in place of the MLP output, CE
  recovered, L0, dead and dense (> 10% of tokens) fractions;
- sparse probing (offline, no LLM): balanced accuracy of k-sparse probes on labels the
  corpus gives for free (source, prose vs documentation, token classes), against the
  model's own MLP neurons;
- autointerp (with `--llm-url`, any OpenAI-compatible endpoint): explanation, then
  detection and fuzzing balanced accuracy per sampled latent;
- dashboards of each dictionary's most frequent latents.

Writes to `--output`: `results.json` and `results.md` (the table, latent densities and
the evidence for each claim), `comparison.html` (plots, with plotly), `probing.json`,
`frequencies.json` (every latent's firing frequency), `autointerp.json` (with an LLM),
`dashboards_<variant>.html`, and the dictionaries with their training record under
`dictionaries/`. Training checkpoints every `--checkpoint-every` steps (`--resume`
continues an interrupted run); `--reuse` measures a finished run's dictionaries again.

    python examples/seed_comparison.py                    # SmolLM2-135M, layers 3 9 15 21, 2M tokens
    python examples/seed_comparison.py --model tiny --tokens 40000 --layers 1 2   # seconds
    python examples/seed_comparison.py --reuse --probe-splits 10   # measure again, no training
    python examples/seed_comparison.py --llm-url http://localhost:8000/v1 --llm-model Qwen/Qwen2.5-7B-Instruct
"""

from __future__ import annotations

import argparse
import glob
import json
import platform
import time
from pathlib import Path

import torch
from seed_evidence import claim_evidence, evidence_markdown

from tl_transcoders.analysis.comparison import (
    VARIANTS,
    compare_variants,
    density_histogram,
    density_table,
    markdown_table,
    plot_comparison,
    rows_without_frequencies,
    train_variants,
)

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "corpus"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="smollm2", help="'smollm2', 'tiny', or a name / directory / .gguf for load_model"
    )
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 9, 15, 21])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument(
        "--train-data",
        default=None,
        help="JSON Lines files (glob) with a text column; default: the shared corpus if present, else the embedded one",
    )
    parser.add_argument("--heldout-data", default=None, help="as --train-data, for evaluation")
    parser.add_argument("--heldout-rows", type=int, default=128, help="rows of --context tokens for splice metrics")
    parser.add_argument("--probe-per-source", type=int, default=40, help="64-token sequences per source for probing")
    parser.add_argument(
        "--probe-splits", type=int, default=5, help="random train/test splits each probing score is averaged over"
    )
    parser.add_argument("--llm-url", default=None, help="OpenAI-compatible endpoint for autointerp (off without)")
    parser.add_argument("--llm-model", default=None)
    parser.add_argument("--llm-api-key", default=None)
    parser.add_argument("--autointerp-latents", type=int, default=50, help="latents sampled per dictionary")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        help="steps between training checkpoints (each holds every dictionary and its optimiser; "
        "removed when training ends)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue training from the checkpoints in --output (same options)"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="measure the dictionaries a finished run saved in --output instead of training",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="seed-comparison")
    return parser.parse_args(argv)


def load(args):
    """The model and a function giving its text datasets (None for the tiny model)."""
    import datasets

    from tl_transcoders.hooks.models import load_model, smollm2_path, tiny_random_model

    if args.model == "tiny":
        return tiny_random_model(), None

    def corpus(pattern: str | None, split: str) -> datasets.Dataset:
        if pattern is None and SHARED.is_dir():
            pattern = str(SHARED / split / "*.jsonl.gz")
        if pattern is None:
            from tl_transcoders.app.corpus import embedded_corpus

            return embedded_corpus(split)
        return datasets.load_dataset("json", data_files=sorted(glob.glob(pattern)), split="train")

    model = load_model(smollm2_path() if args.model == "smollm2" else args.model)
    return model, corpus


def token_data(args, model, corpus):
    """Training batches, held-out rows and (with a tokenizer) probing sequences."""
    from tl_transcoders.io.data import token_batches

    if corpus is None:  # tiny random model: random tokens, nothing to probe
        generator = torch.Generator().manual_seed(args.seed)
        heldout = torch.randint(0, model.cfg.d_vocab, (args.heldout_rows, args.context), generator=generator)

        def batches():
            while True:
                yield torch.randint(0, model.cfg.d_vocab, (args.batch_size, args.context), generator=generator)

        return batches(), heldout, None
    bos = model.tokenizer.bos_token_id
    train = corpus(args.train_data, "train").shuffle(seed=args.seed)
    batches = token_batches(
        train, model.tokenizer, args.context, args.batch_size, bos_token_id=bos, separator_token_id=bos
    )
    heldout_set = corpus(args.heldout_data, "heldout").shuffle(seed=args.seed)
    heldout = next(
        token_batches(
            heldout_set, model.tokenizer, args.context, args.heldout_rows, bos_token_id=bos, separator_token_id=bos
        )
    )
    return batches, heldout, heldout_set


def probing(args, model, variants, heldout_set) -> dict:
    """Sparse probing of every dictionary and of the MLP neurons, per layer."""
    from tl_transcoders.analysis.probing import probe_dictionaries, sequence_labels, token_class_labels, token_sequences

    encode = lambda text: model.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    tokens, sources = token_sequences(heldout_set, encode, 64, args.probe_per_source, model.tokenizer.bos_token_id)
    tasks = sequence_labels(sources)
    token_tasks = token_class_labels(tokens, model.tokenizer)
    results = {}
    for i, layer in enumerate(args.layers):
        feature_sets = {name: transcoders[i] for name, transcoders in variants.items()}
        feature_sets["mlp_neurons"] = f"blocks.{layer}.mlp.hook_post"
        results[str(layer)] = probe_dictionaries(
            model, tokens, feature_sets, tasks, token_tasks, seed=args.seed, n_splits=args.probe_splits
        )
    return results


def autointerp(args, model, variants, heldout) -> dict:
    """Autointerp scores of `--autointerp-latents` random live latents per dictionary."""
    from tl_transcoders.analysis.autointerp import (
        OpenAICompatibleClient,
        aggregate_scores,
        latent_activations,
        score_latents,
    )
    from tl_transcoders.analysis.comparison import latent_frequencies

    client = OpenAICompatibleClient(args.llm_url, args.llm_model, api_key=args.llm_api_key)
    generator = torch.Generator().manual_seed(args.seed)
    results = {}
    for name, transcoders in variants.items():
        for transcoder in transcoders:
            alive = (latent_frequencies(model, transcoder, heldout) > 0).nonzero()[:, 0]
            chosen = alive[torch.randperm(len(alive), generator=generator)[: args.autointerp_latents]].tolist()
            acts = latent_activations(model, transcoder, heldout, chosen)
            scores = score_latents(client, model.tokenizer, heldout, acts, latents=chosen, seed=args.seed)
            results[f"{name}/layer{transcoder.cfg.layer}"] = {
                "aggregate": aggregate_scores(scores),
                "latents": [s.to_dict() for s in scores],
            }
    return results


def dashboards(args, model, variants, heldout, out: Path) -> None:
    """The 8 most frequent latents of each dictionary of the first layer."""
    from tl_transcoders.analysis.dashboards import collect_activations, latent_dashboards, save_dashboards, top_latents

    for name, transcoders in variants.items():
        transcoder = transcoders[0]
        records = collect_activations(model, transcoder, heldout.split(8))
        boards = latent_dashboards(records, top_latents(records, n=8), model, transcoder)
        save_dashboards(out / f"dashboards_{name}.html", boards, f"{name}, layer {transcoder.cfg.layer}")


def train_or_reuse(args, model, batches, out: Path) -> tuple[dict, dict]:
    """The dictionaries by variant, and the training record (`dictionaries/training.json`:
    wall time, machine, options), trained now or, with `--reuse`, loaded from `out`."""
    from tl_transcoders.core.transcoder import Transcoder

    record_path = out / "dictionaries" / "training.json"
    options = {
        "model": model.cfg.model_name,
        "layers": args.layers,
        "k": args.k,
        "expansion": args.expansion,
        "tokens": args.tokens,
        "batch_size": args.batch_size,
        "context": args.context,
        "seed": args.seed,
    }
    if args.reuse:
        if not record_path.exists():
            raise SystemExit(f"--reuse: {record_path} is missing; train first (without --reuse)")
        record = json.loads(record_path.read_text())
        if record["options"] != options:
            changed = {k: (record["options"].get(k), v) for k, v in options.items() if record["options"].get(k) != v}
            raise SystemExit(
                f"--reuse: the saved dictionaries were trained with other options {changed} "
                "(saved, asked); pass the same options or train again"
            )
        variants = {
            v: [Transcoder.load(out / "dictionaries" / v / f"layer_{layer}") for layer in args.layers] for v in VARIANTS
        }
        return variants, record
    started = time.perf_counter()
    variants = train_variants(
        model,
        args.layers,
        batches,
        out / "dictionaries",
        k=args.k,
        expansion=args.expansion,
        max_tokens=args.tokens,
        batch_size=args.batch_size,
        context_size=args.context,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
    )
    record = {
        "options": options,
        "train_s": time.perf_counter() - started,
        "machine": machine(),
        "resumed": args.resume,
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    for checkpoint in (out / "dictionaries").glob("*/checkpoint*.pt"):  # the run is done: no resuming it
        checkpoint.unlink()
    return variants, record


def machine() -> str:
    """The processor, torch threads and torch version, for the results."""
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def summary(rows, probe, interp, run) -> str:
    """results.md: the table, the probing means, the autointerp means and the evidence
    for each claim."""
    lines = [
        f"# SAE vs transcoder vs skip transcoder: {run['model']}",
        "",
        f"{run['tokens']:,} training tokens per dictionary, k = {run['k']}, {run['expansion']}x expansion, "
        f"layers {run['layers']}; held-out: {run['heldout_tokens']:,} tokens. Training took "
        f"{run['train_s']:.0f} s on {run['train_machine']}{' (resumed)' if run['resumed'] else ''}; "
        f"measuring took {run['measure_s']:.0f} s on {run['machine']}.",
        "",
        "## Reconstruction and splice",
        "",
        markdown_table(rows),
        "",
        "## Latent density (fraction of latents by firing frequency on the held-out tokens)",
        "",
        density_table(rows),
        "",
    ]
    if probe:
        sets = list(VARIANTS) + ["mlp_neurons"]
        ks = next(iter(probe.values()))["ks"]
        lines += [
            "## Sparse probing (mean balanced accuracy over tasks)",
            "",
            "| layer | k | " + " | ".join(sets) + " |",
            "|---|---|" + "---|" * len(sets),
        ]
        for layer, table in probe.items():
            for k in ks:
                lines.append(f"| {layer} | {k} | " + " | ".join(f"{table['mean'][s][str(k)]:.3f}" for s in sets) + " |")
        lines.append("")
    if interp:
        lines += [
            "## Autointerp (balanced accuracy, mean ± s.e.)",
            "",
            "| dictionary | detection | fuzzing | n |",
            "|---|---|---|---|",
        ]
        for key, value in interp.items():
            a = value["aggregate"]
            lines.append(
                f"| {key} | {a['detection']['mean']:.3f} ± {a['detection']['sem']:.3f} | "
                f"{a['fuzzing']['mean']:.3f} ± {a['fuzzing']['sem']:.3f} | {a['detection']['n']} |"
            )
        lines.append("")
    lines += ["## Evidence for the claims", "", evidence_markdown(claim_evidence(rows, probe, interp))]
    return "\n".join(lines)


def main(argv=None) -> Path:
    args = parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model, corpus = load(args)
    batches, heldout, heldout_set = token_data(args, model, corpus)
    variants, training = train_or_reuse(args, model, batches, out)
    started = time.perf_counter()
    rows = compare_variants(model, variants, heldout)
    probe = probing(args, model, variants, heldout_set) if heldout_set is not None else {}
    interp = autointerp(args, model, variants, heldout) if args.llm_url else {}
    dashboards(args, model, variants, heldout, out)
    run = {
        "model": model.cfg.model_name,
        "layers": args.layers,
        "k": args.k,
        "expansion": args.expansion,
        "tokens": args.tokens,
        "heldout_tokens": heldout.numel(),
        "probe_per_source": args.probe_per_source,
        "probe_splits": args.probe_splits,
        "train_s": training["train_s"],
        "train_machine": training["machine"],
        "resumed": training["resumed"],
        "measure_s": time.perf_counter() - started,
        "machine": machine(),
    }
    evidence = claim_evidence(rows, probe, interp)
    (out / "results.json").write_text(
        json.dumps(
            {
                "run": run,
                "rows": rows_without_frequencies(rows),
                "density": density_histogram(rows),
                "evidence": evidence,
            },
            indent=2,
        )
        + "\n"
    )
    (out / "frequencies.json").write_text(
        json.dumps({f"{r['variant']}/layer{r['layer']}": r["frequencies"] for r in rows})
    )
    if probe:
        (out / "probing.json").write_text(json.dumps(probe, indent=1) + "\n")
    if interp:
        (out / "autointerp.json").write_text(json.dumps(interp, indent=1) + "\n")
    (out / "results.md").write_text(summary(rows, probe, interp, run) + "\n")
    try:
        plot_comparison(rows).write_html(out / "comparison.html", include_plotlyjs="cdn")
    except ImportError:
        print("plotly is not installed: no comparison.html (pip install 'tl-transcoders[plot]')")
    print(summary(rows, probe, interp, run))
    print(f"wrote the results to {out.resolve()}")
    return out


if __name__ == "__main__":
    main()
