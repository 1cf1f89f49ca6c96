"""Tiny random TransformerLens models of every supported class and architecture.

Backends: `ht` (HookedTransformer, unprocessed), `ht_folded` (after process_weights_),
`bridge` (TransformerBridge) and `bridge_compat` (after enable_compatibility_mode).
HookedTransformer exists only on TransformerLens < 4, so its backends appear only there.
Architectures: `gpt2` (LayerNorm, GELU), `llama` (RMSNorm, gated SiLU MLP, rotary, GQA)
and `sandwich` (Gemma-2 style norms before and after the MLP). Norm weights are
randomised so that folded and unfolded input spaces really differ.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)

from tl_transcoders import (  # noqa: E402
    CrossLayerConfig,
    CrossLayerTranscoder,
    Transcoder,
    cross_layer_config,
    transcoder_config,
)

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:  # TransformerLens 4 removed HookedTransformer
    HookedTransformer = None
try:
    from transformer_lens.model_bridge import TransformerBridge
except ImportError:  # TransformerLens 2.x has no TransformerBridge
    TransformerBridge = None

ARCHS = {
    "gpt2": dict(act_fn="gelu"),
    "llama": dict(
        normalization_type="RMS",
        gated_mlp=True,
        act_fn="silu",
        positional_embedding_type="rotary",
        rotary_dim=4,
        n_key_value_heads=2,
        final_rms=True,
    ),
}
ARCHS["sandwich"] = dict(ARCHS["llama"], use_normalization_before_and_after=True)
SHAPE = dict(n_layers=3, d_model=16, d_head=4, n_heads=4, d_mlp=32, n_ctx=32, d_vocab=50, seed=0)

BACKENDS = (["ht", "ht_folded"] if HookedTransformer is not None else []) + (
    ["bridge", "bridge_compat"] if TransformerBridge is not None else []
)
MODEL_PARAMS = [f"{backend}-{arch}" for backend in BACKENDS for arch in ARCHS]

_tmp_dirs: list[tempfile.TemporaryDirectory] = []


_NORM_PARAM = re.compile(r"(^|\.)(ln\w*|\w*norm\w*)\.(\w+\.)?(w|weight|b|bias)$")


def _randomise_norms(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            match = _NORM_PARAM.search(name)
            if match is None:
                continue
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.3 * noise if match.group(4) in ("w", "weight") else 0.1 * noise)


def _bridge(arch: str):
    from transformer_lens.model_bridge import TransformerBridge

    if arch == "sandwich":
        return _gemma2_bridge()
    try:
        from transformer_lens.config import TransformerBridgeConfig
    except ImportError:
        from transformer_lens.model_bridge import TransformerBridgeConfig
    return TransformerBridge.boot_native(
        TransformerBridgeConfig(**SHAPE, **ARCHS["llama" if arch == "llama" else "gpt2"])
    )


def word_tokenizer():
    """A word-level tokenizer of the test vocabulary: "<pad>", "<eos>", "<bos>", "<unk>",
    then the words w0 .. w45."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(46)])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _saved_word_tokenizer():
    """`word_tokenizer` read back from a directory (TransformerLens 2.x reloads a
    tokenizer by the path it was loaded from)."""
    from transformers import PreTrainedTokenizerFast

    tmp = tempfile.TemporaryDirectory()
    _tmp_dirs.append(tmp)
    word_tokenizer().save_pretrained(tmp.name)
    return PreTrainedTokenizerFast.from_pretrained(tmp.name)


def _gemma2_bridge():
    """A Gemma-2 Bridge from a local directory (the native Bridge has no sandwich norms)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tmp = tempfile.TemporaryDirectory()
    _tmp_dirs.append(tmp)
    word_tokenizer().save_pretrained(tmp.name)
    cfg = Gemma2Config(
        vocab_size=SHAPE["d_vocab"],
        hidden_size=SHAPE["d_model"],
        intermediate_size=SHAPE["d_mlp"],
        num_hidden_layers=SHAPE["n_layers"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        max_position_embeddings=SHAPE["n_ctx"],
        sliding_window=SHAPE["n_ctx"],
        query_pre_attn_scalar=4,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Gemma2ForCausalLM(cfg).eval().save_pretrained(tmp.name)
    return TransformerBridge.boot_transformers(tmp.name, device="cpu", dtype=torch.float32)


def available(name: str) -> str:
    """`name` (`{backend}-{arch}`), or where this TransformerLens has no TransformerBridge
    (2.x) the HookedTransformer standing in for it: `ht` for `bridge`, `ht_folded` for
    `bridge_compat`, and for the Gemma-2 Bridge, which tests use for its tokenizer, a
    HookedTransformer of the same architecture with that tokenizer (`ht_words`)."""
    backend, arch = name.split("-")
    if TransformerBridge is not None or not backend.startswith("bridge"):
        return name
    if name == "bridge-sandwich":
        return "ht_words-sandwich"
    return {"bridge": "ht", "bridge_compat": "ht_folded"}[backend] + "-" + arch


def build_model(name: str) -> torch.nn.Module:
    """The model named `{backend}-{arch}` (built once per session; see `available`)."""
    return _build_model(available(name))


@functools.cache
def _build_model(name: str) -> torch.nn.Module:
    backend, arch = name.split("-")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if backend.startswith("ht"):
            tokenizer = _saved_word_tokenizer() if backend == "ht_words" else None
            model = HookedTransformer(HookedTransformerConfig(**SHAPE, **ARCHS[arch]), tokenizer=tokenizer)
            _randomise_norms(model)
            if backend == "ht_folded":
                model.process_weights_()
                model.setup()  # TransformerLens 2.x does not register the new norms' hook points itself
        else:
            model = _bridge(arch)
            _randomise_norms(model)
            if backend == "bridge_compat":
                model.enable_compatibility_mode(disable_warnings=True)
    model.eval()
    return model


@pytest.fixture(params=MODEL_PARAMS)
def model(request) -> torch.nn.Module:
    return build_model(request.param)


@pytest.fixture
def tokens(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.cfg.d_vocab, (3, 12), generator=generator)


def make_transcoder(
    model: torch.nn.Module,
    layer: int,
    activation: str = "topk",
    skip: bool = True,
    d_latent: int = 48,
    k: int = 6,
    seed: int = 0,
    **sites,
) -> Transcoder:
    """A transcoder for `layer` of `model` with random weights, biases and skip, so that
    every term of its output is non-zero."""
    cfg = transcoder_config(model, layer, d_latent=d_latent, activation=activation, k=k, skip=skip, **sites)
    with torch.random.fork_rng(devices=[]):  # the decoder keeps its initialisation: seed it too
        torch.manual_seed(seed)
        transcoder = Transcoder(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transcoder.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name == "threshold":
                param.copy_(0.05 * noise.abs())
            elif name != "W_dec":
                param.copy_(0.3 * noise)
    return transcoder.eval()


def make_clt(model=None, layers=None, activation="topk", skip=True, d_latent=40, k=5, seed=0, **fields):
    """A cross-layer transcoder with random weights everywhere (biases, skip and
    thresholds too), for `model` or, without one, for d_model 12 over layers 1..3."""
    if model is not None:
        cfg = cross_layer_config(model, layers, d_latent=d_latent, activation=activation, k=k, skip=skip, **fields)
    else:
        cfg = CrossLayerConfig(
            d_model=12, d_latent=d_latent, n_layers=3, first_layer=1, activation=activation, k=k, skip=skip
        )
    with torch.random.fork_rng(devices=[]):  # the decoders keep their initialisation: seed them too
        torch.manual_seed(seed)
        clt = CrossLayerTranscoder(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in clt.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name == "threshold":
                param.copy_(0.05 * noise.abs())
            elif not name.startswith("W_dec"):
                param.copy_(0.3 * noise)
    return clt.eval()


@contextlib.contextmanager
def weights_changed(module: torch.nn.Module, change) -> Iterator[None]:
    """Run the block with `change(parameter)` applied in place to every parameter of
    `module` (part of a cached test model), and restore the weights after. A deepcopy of
    the model is no way out: a Bridge that has run may hold non-leaf tensors, which
    deepcopy refuses."""
    saved = [p.detach().clone() for p in module.parameters()]
    try:
        with torch.no_grad():
            for p in module.parameters():
                change(p)
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(module.parameters(), saved):
                p.copy_(value)


@pytest.fixture
def without_type_checker():
    """Run a test as a user's import runs the library: without the runtime type checker
    that the test suite adds (`--jaxtyping-packages`), so wrong argument types reach the
    library's own checks and messages."""
    import jaxtyping

    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


def attribute_command(model: torch.nn.Module, tmp_path: Path, out: Path) -> tuple[list, list[str], torch.Tensor]:
    """Relu transcoders of layers 0 and 2 saved under `tmp_path`, a 7-token prompt
    saved as `prompt.pt`, and the `tl-transcoders attribute` arguments that read them
    and write to `out`: (transcoders, arguments, prompt tokens)."""
    transcoders = [make_transcoder(model, layer, activation="relu", seed=layer) for layer in (0, 2)]
    for t in transcoders:
        t.save(tmp_path / f"layer_{t.cfg.layer}")
    tokens = torch.randint(3, model.cfg.d_vocab, (7,), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "prompt.pt")
    arguments = ["attribute", "--model", "tiny", "--transcoders", str(tmp_path / "layer_0"), str(tmp_path / "layer_2")]
    return transcoders, arguments + ["--tokens", str(tmp_path / "prompt.pt"), "--out", str(out)], tokens
