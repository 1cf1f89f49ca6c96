"""load_model on local Hugging Face directories and GGUF files, offline, against the
Hugging Face model's own log-probs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tl_transcoders.hooks.models import ModelLoadError, load_model
from tl_transcoders.hooks.sites import is_bridge

transformers = pytest.importorskip("transformers")

SPECIAL = ["<|endoftext|>", "<|im_start|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("a", "n")]
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)
TEXT = "the cat and the hen ran at the end"


def vocabulary() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIAL + sorted(bytes_to_unicode().values())
    return tokens + [a + b for a, b in MERGES]


def tiny_llama(seed: int = 0):
    """A random LLaMA-architecture HF model with a byte-level BPE tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = vocabulary()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokens), bos_token_id=0, eos_token_id=0, tie_word_embeddings=False, **SHAPE)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norm weights, so folding them is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    # A byte-level BPE built with `tokenizers`, which transformers 4 and 5 both wrap the same way
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=MERGES))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=special, eos_token=special, unk_token=special)
    return model, tokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    model, tokenizer = tiny_llama()
    directory = tmp_path_factory.mktemp("hf") / "tiny-model"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_gguf(path: Path, model, bos_id: int) -> None:
    """`model` as an F32 GGUF file in llama.cpp's layout (q/k rows permuted for its
    rotary convention), with a byte-level BPE tokenizer whose declared BOS is `bos_id`."""
    gguf = pytest.importorskip("gguf")
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(SHAPE["rope_theta"])
    writer.add_vocab_size(c.vocab_size)
    tokens = vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
    writer.add_token_merges([f"{a} {b}" for a, b in MERGES])
    writer.add_bos_token_id(bos_id)
    writer.add_eos_token_id(0)

    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {
        "self_attn.o_proj": "attn_output",
        "self_attn.v_proj": "attn_v",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        for hf, ours in names.items():
            writer.add_tensor(f"blk.{i}.{ours}.weight", sd[p + hf + ".weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_TRANSCODERS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(ids).float(), dim=-1)


def hf_log_probs(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf_model(ids).logits, dim=-1)


def has_hooked_transformer() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def bridge_options() -> list[bool | None]:
    """Both classes where this TransformerLens has both, else its one (None picks it)."""
    from tl_transcoders.hooks.sites import bridge_class

    return [None, True] if has_hooked_transformer() and bridge_class() is not None else [None]


@pytest.mark.parametrize("bridge", bridge_options())
def test_local_directory_matches_hugging_face(hf_dir, bridge):
    hf_model, tokenizer = tiny_llama()
    model = load_model(hf_dir, bridge=bridge)
    assert is_bridge(model) == (bridge is True or not has_hooked_transformer())
    ids = model.to_tokens(TEXT)
    assert ids[0, 0] == tokenizer.bos_token_id
    assert ids[0, 1:].tolist() == tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert (log_probs(model, ids) - hf_log_probs(hf_model, ids)).abs().max() < 1e-3
    assert model.cfg.model_name == "tiny-model"


def test_path_with_an_architecture_name(hf_dir, tmp_path):
    """A directory whose path says "llama" loads from its config, not from the name."""
    directory = tmp_path / "my-llama-copy"
    shutil.copytree(hf_dir, directory)
    hf_model, _ = tiny_llama()
    model = load_model(directory)
    ids = model.to_tokens(TEXT)
    assert (log_probs(model, ids) - hf_log_probs(hf_model, ids)).abs().max() < 1e-3
    assert model.cfg.model_name == "my-llama-copy"


def test_gguf_matches_hugging_face_and_picks_the_document_separator(tmp_path):
    hf_model, tokenizer = tiny_llama()
    gguf_path = tmp_path / "Tiny-Chat.F32.gguf"
    write_gguf(gguf_path, hf_model, bos_id=1)  # declares <|im_start|> as BOS
    model = load_model(gguf_path)
    ids = model.to_tokens(TEXT)
    assert ids[0, 0] == 0  # <|endoftext|>, the document separator
    # The GGUF holds the same weights as the HF model (q/k permuted and back).
    assert (log_probs(model, ids) - hf_log_probs(hf_model, ids)).abs().max() < 1e-3
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=gguf_path.name, dtype=torch.float32
    )
    assert (log_probs(model, ids) - hf_log_probs(reference, ids)).abs().max() < 1e-3
    assert model.cfg.model_name == "Tiny-Chat.F32"
    # Cached: a second load converts nothing and gives the same model.
    again = load_model(gguf_path, bos_token="<|im_start|>")
    assert again.to_tokens(TEXT)[0, 0] == 1
    assert torch.equal(log_probs(again, ids), log_probs(model, ids))


def test_bad_paths(tmp_path, hf_dir):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nowhere.gguf")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="must be a .gguf"):
        load_model(tmp_path / "weights.bin")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 12)
    with pytest.raises(ModelLoadError, match="could not read this GGUF"):
        load_model(tmp_path / "broken.gguf")
    with pytest.raises(ModelLoadError, match="not in the tokenizer's vocabulary"):
        load_model(hf_dir, bos_token="<nope>")
