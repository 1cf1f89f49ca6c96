"""circuit-tracer 0.5.0 side of benchmarks/attribution.py (runs in its own virtualenv,
which attribution.py starts it in).

`bash benchmarks/setup.sh` makes that virtualenv, .bench/venvs/circuit-tracer: torch==2.13.0
first, then circuit-tracer==0.5.0 (which brings TL 3.2.1 and transformers 4.57.3);
`$CT_PYTHON` names another interpreter instead.

Builds circuit-tracer's `TransformerLensReplacementModel` from a local HF directory (its
`from_pretrained_and_transcoders` only takes Hub names): TL config and state dict from
the directory (RMSNorm not folded, nothing centred, as circuit-tracer loads models; the
rotary base set from `rope_theta` by hand, since TL 3.2.1 leaves Llama's at 10000),
weights loaded BEFORE `_configure_replacement_model` (which wraps the MLPs), and the
transcoders from a `config.yaml` (`model_kind: transcoder_set`, `scan`, hooks and
`layer_{i}.safetensors` paths) with eager encoder and decoder weights. Then times
`circuit_tracer.attribute(tokens, model, max_feature_nodes=F)` with its defaults
(batch_size 512) and writes the figures (JSON) and the graph's tensors (torch.save) in
the layout of tl_transcoders' `Graph`: selected features, errors, tokens, logits.
The prompt starts with the special token id 0, so circuit-tracer prepends nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import peak_rss_mib, reset_peak_rss, rss_mib, vm_hwm_mib  # noqa: E402


def load_model(model_dir: str, transcoder_config: str, n_ctx: int):
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from circuit_tracer.utils.hf_utils import load_transcoders
    from transformer_lens import loading
    from transformers import AutoTokenizer

    cfg = loading.get_pretrained_model_config(model_dir, fold_ln=False, n_ctx=n_ctx, dtype=torch.float32, device="cpu")
    # TL 3.2.1's Llama config never reads rope_theta (it keeps the default 10000).
    cfg.rotary_base = json.loads((Path(model_dir) / "config.json").read_text())["rope_theta"]
    state = loading.get_pretrained_state_dict(model_dir, cfg, dtype=torch.float32)
    model = TransformerLensReplacementModel(cfg, AutoTokenizer.from_pretrained(model_dir), move_to_device=False)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False)
    del state
    config = yaml.safe_load(Path(transcoder_config).read_text())
    transcoders = load_transcoders(
        config, device=torch.device("cpu"), dtype=torch.float32, lazy_encoder=False, lazy_decoder=False
    )
    model._configure_replacement_model(transcoders)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--transcoders", required=True, help="config.yaml of the transcoder set")
    parser.add_argument("--prompts", required=True, help="JSON with the prompt's token ids under 'tokens'")
    parser.add_argument("--n-pos", type=int, required=True)
    parser.add_argument("--max-features", type=int, required=True)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--graph", required=True)
    args = parser.parse_args()

    from circuit_tracer import attribute

    torch.set_num_threads(args.threads)
    model = load_model(args.model_dir, args.transcoders, args.n_ctx)
    tokens = torch.tensor(json.loads(Path(args.prompts).read_text())["tokens"][: args.n_pos])
    reset_peak_rss()
    rss_before = rss_mib()
    start, cpu_start = time.perf_counter(), time.process_time()
    graph = attribute(tokens, model, max_feature_nodes=args.max_features)
    wall = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    peak = vm_hwm_mib()

    active = graph.active_features
    selected = graph.selected_features
    torch.save(
        {
            "tokens": graph.input_tokens.cpu(),
            "features": active[selected].cpu(),
            "activations": graph.activation_values[selected].float().cpu(),
            "logit_tokens": torch.tensor([t.vocab_idx for t in graph.logit_targets]),
            "logit_probabilities": graph.logit_probabilities.cpu(),
            "adjacency": graph.adjacency_matrix.cpu(),
            "n_layers": model.cfg.n_layers,
        },
        args.graph,
    )
    n_active = int(active.shape[0])
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
                "n_feature_nodes": int(selected.shape[0]),
                "n_logits": len(graph.logit_targets),
                "firing_fraction": n_active
                / ((args.n_pos - 1) * model.cfg.n_layers * model.transcoders[0].W_enc.shape[0]),
                "options": {"batch_size": 512, "update_interval": 4, "max_n_logits": 10, "desired_logit_prob": 0.95},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
