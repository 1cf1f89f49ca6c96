"""Getting a hooked model: a Hugging Face name through TransformerLens, or a tiny
random model for demos and quick checks.

`load_model` uses `HookedTransformer.from_pretrained` where TransformerLens still has it
(< 4.0) and `TransformerBridge.boot_transformers` otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

TINY_SHAPE = dict(
    n_layers=4,
    d_model=64,
    d_head=16,
    n_heads=4,
    d_mlp=256,
    n_ctx=128,
    d_vocab=512,
    act_fn="silu",
    normalization_type="RMS",
    gated_mlp=True,
    positional_embedding_type="rotary",
    rotary_dim=16,
    n_key_value_heads=2,
    final_rms=True,
)
"""A LLaMA-shaped model small enough to run anything in seconds on a CPU."""


def load_model(name_or_path: str, device: str | None = None) -> nn.Module:
    """A pretrained model by Hugging Face name (or local directory on TL 4.x), in fp32."""
    try:
        from transformer_lens import HookedTransformer
    except ImportError:
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge.boot_transformers(name_or_path, device=device, dtype=torch.float32)
    return HookedTransformer.from_pretrained(name_or_path, device=device)


def tiny_random_model(seed: int = 0) -> nn.Module:
    """A randomly initialised `TINY_SHAPE` model (HookedTransformer where available,
    else a native TransformerBridge); needs no download."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        from transformer_lens.model_bridge import TransformerBridge

        try:
            from transformer_lens.config import TransformerBridgeConfig
        except ImportError:
            from transformer_lens.model_bridge import TransformerBridgeConfig
        return TransformerBridge.boot_native(TransformerBridgeConfig(**TINY_SHAPE, seed=seed))
    return HookedTransformer(HookedTransformerConfig(**TINY_SHAPE, seed=seed))
