"""Interop for cross-layer transcoders: EleutherAI clt-training runs load into
`CrossLayerTranscoder`s that compute what the library computed (outputs recorded by the
library itself, see tests/fixtures/generate_clt_training.py); what cannot be represented
is refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tl_transcoders import CrossLayerTranscoder, TranscoderFileError
from tl_transcoders.io.loading import FORMATS, detect_format, load_directory, load_pretrained

CLT_TRAINING = Path(__file__).parent / "fixtures" / "clt_training"


def expected(variant: str) -> dict[str, torch.Tensor]:
    """What clt-training's `CrossLayerRunner` returned for the fixture `variant`."""
    tensors = load_file(CLT_TRAINING / "expected.safetensors")
    return {k.removeprefix(f"{variant}/"): v for k, v in tensors.items() if k.startswith(f"{variant}/")}


def assert_matches(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("variant, skip", [("full", False), ("window_tied", False), ("skip", True)])
def test_clt_training_runs_reproduce_the_librarys_outputs_and_latents(variant, skip):
    clt = load_pretrained(CLT_TRAINING / variant)
    assert isinstance(clt, CrossLayerTranscoder)
    c = clt.cfg
    assert (c.n_layers, c.first_layer, c.d_model, c.d_latent) == (3, 0, 16, 32)
    assert (c.activation, c.k, c.skip) == ("topk", 4, skip)
    assert (c.input_hook, c.output_hook, c.input_space) == ("mlp.hook_in", "mlp.hook_out", "unfolded_ln")
    ref = expected(variant)
    x = ref["x"]
    with torch.no_grad():
        assert_matches(clt(x), ref["out"])
        for i, layer in enumerate(c.layers):
            latents = clt.encode(layer, x[i])
            theirs = torch.zeros_like(latents).scatter(-1, ref["indices"][i], ref["acts"][i])
            assert torch.equal(latents > 0, theirs > 0)  # the same latents selected
            assert_matches(latents, theirs)


def test_clt_training_window_leaves_decoders_past_it_zero():
    clt = load_pretrained(CLT_TRAINING / "window_tied")  # cross_layer=2: layer 0 does not reach layer 2
    assert torch.equal(clt.W_dec[0][:, 2], torch.zeros_like(clt.W_dec[0][:, 2]))
    assert clt.W_dec[0][:, :2].ne(0).all() and clt.W_dec[1].ne(0).all()


def test_detect_format_names_clt_training():
    assert "clt-training" in FORMATS
    assert detect_format(CLT_TRAINING / "full") == "clt-training"
    assert isinstance(load_directory(CLT_TRAINING / "full", dtype=torch.float64), CrossLayerTranscoder)


def test_one_layer_of_a_clt_training_run_is_refused_naming_the_run(tmp_path):
    with pytest.raises(TranscoderFileError, match="load the run's directory"):
        load_pretrained(CLT_TRAINING / "full" / "layers.1.mlp")
    with pytest.raises(TranscoderFileError, match="do not apply"):
        load_pretrained(CLT_TRAINING / "full", layers=[1])


def run_copy(tmp_path: Path, variant: str = "full") -> Path:
    return Path(shutil.copytree(CLT_TRAINING / variant, tmp_path / variant))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_tensors(path: Path, **changes) -> None:
    tensors = load_file(path)
    for name, value in changes.items():
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    save_file(tensors, path)


@pytest.mark.parametrize(
    "layer, changes, message",
    [
        (1, {"activation": "batchtopk"}, "'batchtopk' is not supported.*across the whole batch"),
        (0, {"activation": "groupmax"}, "'groupmax' is not supported"),
        (0, {"coalesce_topk": "concat"}, "coalesce_topk='concat' is not supported"),
        (2, {"secondary_target_tied": True}, "secondary_target_tied is not supported"),
        (0, {"use_fp8": True}, "use_fp8 is not supported"),
        (1, {"k": 8}, "k is 8 here but 4"),
        (0, {"n_targets": 4}, "n_targets=4, but 3 layers start here"),
    ],
)
def test_clt_training_configs_that_cannot_be_represented_are_refused(tmp_path, layer, changes, message):
    run = run_copy(tmp_path)
    edit_json(run / f"layers.{layer}.mlp" / "cfg.json", **changes)
    with pytest.raises(TranscoderFileError, match=message):
        load_pretrained(run)


def test_clt_training_skip_connections_into_later_layers_are_refused(tmp_path):
    run = run_copy(tmp_path)
    for i in range(3):
        edit_json(run / f"layers.{i}.mlp" / "cfg.json", skip_connection=True)
    with pytest.raises(TranscoderFileError, match="skip connections into later layers"):
        load_pretrained(run)


def test_clt_training_nonzero_post_encoder_biases_are_refused(tmp_path):
    run = run_copy(tmp_path)
    edit_tensors(run / "layers.0.mlp" / "sae.safetensors", **{"post_encs.1": torch.full((32,), 0.1)})
    with pytest.raises(TranscoderFileError, match="post_encs.1 is non-zero"):
        load_pretrained(run)


def test_clt_training_run_problems_are_refused(tmp_path):
    run = run_copy(tmp_path)
    edit_json(run / "config.json", hookpoints_in=[f"layers.{i}.post_attention_layernorm" for i in range(3)])
    with pytest.raises(TranscoderFileError, match="hookpoints_in is not supported"):
        load_pretrained(run)
    (run / "config.json").unlink()
    (run / "layers.2.mlp").rename(run / "layers.5.mlp")
    with pytest.raises(TranscoderFileError, match="consecutive"):
        load_pretrained(run)
    (run / "layers.5.mlp").rename(run / "attn_out")
    with pytest.raises(TranscoderFileError, match="cannot tell which TransformerLens hooks"):
        load_pretrained(run)


def test_damaged_clt_training_files_are_refused(tmp_path):
    run = run_copy(tmp_path)
    edit_tensors(run / "layers.1.mlp" / "sae.safetensors", **{"b_decs.1": None})
    with pytest.raises(TranscoderFileError, match=r"layers.1.mlp/sae.safetensors.*missing \['b_decs.1'\]"):
        load_pretrained(run)
    (run / "layers.1.mlp" / "sae.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TranscoderFileError, match="layers.1.mlp/sae.safetensors"):
        load_pretrained(run)
    (run / "layers.2.mlp" / "cfg.json").write_text("{not json")
    with pytest.raises(TranscoderFileError, match="layers.2.mlp/cfg.json: not valid JSON"):
        load_pretrained(run)
