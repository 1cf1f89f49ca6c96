"""Interop: files written by sparsify, SAELens and circuit-tracer load into `Transcoder`s
that compute what those libraries computed (outputs recorded by the libraries
themselves, see tests/fixtures/generate_*.py); export to circuit-tracer; the Hub path;
clear errors for bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_model
from safetensors.torch import load_file, save_file

from tl_transcoders import SpliceError, Transcoder, TranscoderConfig, TranscoderFileError, check_compatible
from tl_transcoders.io.loading import (
    detect_format,
    export_circuit_tracer,
    load_directory,
    load_pretrained,
    sparsify_hookpoint_sites,
)

FIXTURES = Path(__file__).parent / "fixtures"
SPARSIFY, SAELENS, CIRCUIT_TRACER = FIXTURES / "sparsify", FIXTURES / "saelens", FIXTURES / "circuit_tracer"


def expected(library: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The outputs the library recorded for the fixture `prefix`."""
    tensors = load_file(library / "expected.safetensors")
    return {k.removeprefix(f"{prefix}/"): v for k, v in tensors.items() if k.startswith(f"{prefix}/")}


def assert_matches(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale)


# --------------------------------------------------------------------------- sparsify


@pytest.mark.parametrize("name", ["transcoder/layers.0.mlp", "transcoder/layers.1.mlp", "sae/layers.1"])
def test_sparsify_outputs_and_topk_latents_match_the_library(name):
    transcoder = load_pretrained(SPARSIFY / name)
    ref = expected(SPARSIFY, name)
    x = ref["x"]
    with torch.no_grad():
        assert_matches(transcoder(x), ref["out"])
        latents = transcoder.encode(x)
    theirs = torch.zeros_like(latents).scatter(-1, ref["indices"], ref["acts"])
    assert torch.equal(latents > 0, theirs > 0)  # the same latents selected
    assert (theirs > 0).sum(-1).eq(transcoder.cfg.k).all()
    assert_matches(latents, theirs)


def test_sparsify_training_directory_loads_every_hookpoint():
    transcoders = load_pretrained(SPARSIFY / "transcoder")
    assert detect_format(SPARSIFY / "transcoder") == "sparsify"
    assert [t.cfg.layer for t in transcoders] == [0, 1]
    for layer, t in enumerate(transcoders):
        c = t.cfg
        assert (c.input_site, c.output_site) == (f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.mlp.hook_out")
        assert (c.activation, c.k, c.skip, c.d_in, c.d_out, c.d_latent) == ("topk", 6, True, 16, 16, 64)
        assert c.input_space == "unfolded_ln"
    only = load_directory(SPARSIFY / "transcoder", layers=[1])
    assert [t.cfg.layer for t in only] == [1]


def test_sparsify_sae_folds_the_input_shift_into_the_encoder_bias():
    sae = load_pretrained(SPARSIFY / "sae" / "layers.1")
    raw = load_file(SPARSIFY / "sae" / "layers.1" / "sae.safetensors")
    assert sae.cfg.is_sae and sae.cfg.input_site == "blocks.1.hook_resid_post" and not sae.cfg.skip
    assert sae.cfg.input_space == "any"
    x = torch.randn(5, 16)
    shifted = (x - raw["b_dec"]) @ raw["encoder.weight"].T + raw["encoder.bias"]
    torch.testing.assert_close(sae.pre_activations(x), shifted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "hookpoint, transcode, sites",
    [
        ("layers.3.mlp", True, (3, "blocks.3.mlp.hook_in", "blocks.3.mlp.hook_out")),
        ("model.layers.3.mlp", True, (3, "blocks.3.mlp.hook_in", "blocks.3.mlp.hook_out")),
        ("h.2.mlp", True, (2, "blocks.2.mlp.hook_in", "blocks.2.mlp.hook_out")),
        ("gpt_neox.layers.5.mlp", False, (5, "blocks.5.mlp.hook_out", "blocks.5.mlp.hook_out")),
        ("layers.4", True, (4, "blocks.4.hook_resid_pre", "blocks.4.hook_resid_post")),
        ("layers.4", False, (4, "blocks.4.hook_resid_post", "blocks.4.hook_resid_post")),
        ("layers.4.self_attn", False, (4, None, None)),
        ("embed_tokens", False, (None, None, None)),
    ],
)
def test_sparsify_hookpoints_map_to_transformer_lens_sites(hookpoint, transcode, sites):
    assert sparsify_hookpoint_sites(hookpoint, transcode) == sites


def test_unknown_hookpoint_needs_the_caller_to_place_it(tmp_path):
    directory = tmp_path / "embed_out"
    shutil.copytree(SPARSIFY / "transcoder" / "layers.0.mlp", directory)
    with pytest.raises(TranscoderFileError, match="pass layer=N"):
        load_pretrained(directory)
    t = load_pretrained(
        directory,
        layer=2,
        input_site="blocks.{layer}.hook_resid_mid",
        output_site="blocks.{layer}.hook_mlp_out",
        input_space="any",
        model_name="m",
    )
    c = t.cfg
    assert (c.layer, c.input_site, c.output_site, c.input_space, c.model_name) == (
        2,
        "blocks.2.hook_resid_mid",
        "blocks.2.hook_mlp_out",
        "any",
        "m",
    )


# --------------------------------------------------------------------------- SAELens

SAELENS_KINDS = {
    # architecture: (activation, skip, is_sae)
    "standard": ("relu", False, True),
    "topk": ("topk", False, True),
    "jumprelu": ("jumprelu", False, True),
    "transcoder": ("relu", False, False),
    "skip_transcoder": ("relu", True, False),
    "jumprelu_transcoder": ("jumprelu", False, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, False),
}


@pytest.mark.parametrize("architecture", SAELENS_KINDS)
def test_saelens_encode_decode_forward_match_the_library(architecture):
    transcoder = load_pretrained(SAELENS / architecture)
    activation, skip, is_sae = SAELENS_KINDS[architecture]
    c = transcoder.cfg
    assert (c.activation, c.skip, c.is_sae, c.layer, c.model_name) == (activation, skip, is_sae, 1, "tiny-test")
    assert c.input_site == ("blocks.1.hook_resid_post" if is_sae else "blocks.1.ln2.hook_normalized")
    assert c.output_site == ("blocks.1.hook_resid_post" if is_sae else "blocks.1.hook_mlp_out")
    assert c.input_space == "any"
    ref = expected(SAELENS, architecture)
    with torch.no_grad():
        latents = transcoder.encode(ref["x"])
        assert torch.equal(latents > 0, ref["acts"] > 0)
        assert_matches(latents, ref["acts"])
        assert_matches(transcoder.decode(ref["acts"]), ref["decoded"])
        assert_matches(transcoder(ref["x"]), ref["out"])


def test_saelens_jumprelu_negative_thresholds_act_as_zero():
    raw = load_file(SAELENS / "jumprelu" / "sae_weights.safetensors")
    assert (raw["threshold"] < 0).any()
    sae = load_pretrained(SAELENS / "jumprelu")
    assert torch.equal(sae.threshold, raw["threshold"].clamp(min=0))


def test_saelens_directory_of_saes_loads_as_a_list():
    loaded = load_pretrained(SAELENS)
    assert len(loaded) == len(SAELENS_KINDS) and all(isinstance(t, Transcoder) for t in loaded)


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(normalize_activations="layer_norm"), "normalize_activations='layer_norm' cannot be represented"),
        (dict(normalize_activations="expected_average_only_in"), "fold_activation_norm_scaling_factor"),
        (dict(architecture="gated"), "architecture 'gated' is not supported"),
        (dict(d_sae="many"), "field 'd_sae' has the wrong type"),
        (dict(d_in=None), "no 'd_in' field"),
        (dict(activation_fn_str="topk"), "pre-6.0 SAELens config with activation 'topk'"),
        (dict(reshape_activations="hook_z"), "reshape_activations='hook_z'"),
    ],
)
def test_saelens_files_that_cannot_be_represented_are_refused(tmp_path, changes, message):
    directory = tmp_path / "sae"
    shutil.copytree(SAELENS / "skip_transcoder", directory)
    edit_json(directory / "cfg.json", **changes)
    with pytest.raises(TranscoderFileError, match=message) as err:
        load_pretrained(directory)
    assert str(directory / "cfg.json") in str(err.value)


# --------------------------------------------------------------------------- circuit-tracer


@pytest.mark.parametrize("name", ["relu", "jumprelu_skip"])
def test_circuit_tracer_sets_match_the_library(name):
    transcoders = load_pretrained(CIRCUIT_TRACER / name)
    assert [t.cfg.layer for t in transcoders] == [0, 1, 2]
    for layer, t in enumerate(transcoders):
        c = t.cfg
        assert (c.input_site, c.output_site, c.input_space) == (
            f"blocks.{layer}.mlp.hook_in",
            f"blocks.{layer}.mlp.hook_out",
            "unfolded_ln",
        )
        assert (c.activation, c.skip) == (("jumprelu", True) if name == "jumprelu_skip" else ("relu", False))
        ref = expected(CIRCUIT_TRACER, f"{name}/layer_{layer}")
        with torch.no_grad():
            assert_matches(t.encode(ref["x"]), ref["acts"])
            assert_matches(t(ref["x"]), ref["out"])


def test_circuit_tracer_layers_selects_files(tmp_path):
    directory = tmp_path / "set"
    shutil.copytree(CIRCUIT_TRACER / "relu", directory)
    (directory / "layer_0.safetensors").write_bytes(b"not read")
    assert [t.cfg.layer for t in load_directory(directory, layers=[1, 2])] == [1, 2]
    with pytest.raises(TranscoderFileError, match="no transcoder for layer"):
        load_directory(directory, layers=[7])


def test_circuit_tracer_file_entries(tmp_path, monkeypatch):
    import huggingface_hub

    directory = copy(tmp_path, CIRCUIT_TRACER / "jumprelu_skip")
    reference = load_pretrained(CIRCUIT_TRACER / "jumprelu_skip")
    config = yaml.safe_load((directory / "config.yaml").read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (directory / "layer_2.safetensors").rename(elsewhere / "layer_2.safetensors")
    downloads = []

    def fake_hf_hub_download(repo_id, filename, revision=None):
        downloads.append((repo_id, filename, revision))
        return str(elsewhere / Path(filename).name)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    config["transcoders"] = [
        str((directory / "layer_0.safetensors").resolve()),  # absolute
        "hf://org/this-repo/layer_1.safetensors",  # in the snapshot: no download
        "hf://org/other-repo/sub/layer_2.safetensors@v2",  # downloaded
    ]
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    loaded = load_pretrained(directory)
    assert downloads == [("org/other-repo", "sub/layer_2.safetensors", "v2")]
    x = torch.randn(4, 16)
    for a, b in zip(reference, loaded):
        assert torch.equal(a(x), b(x))
    shutil.move(str(elsewhere / "layer_2.safetensors"), directory / "layer_2.safetensors")
    del config["transcoders"]  # then the layer_{i}.safetensors files beside the config
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    assert [t.cfg.layer for t in load_pretrained(directory)] == [0, 1, 2]


def random_transcoders(activation: str, skip: bool, n_layers: int = 3) -> list[Transcoder]:
    generator = torch.Generator().manual_seed(0)
    transcoders = []
    for layer in range(n_layers):
        cfg = TranscoderConfig(
            d_in=16,
            d_out=16,
            d_latent=32,
            layer=layer,
            activation=activation,
            k=4,
            skip=skip,
            input_space="unfolded_ln",
            model_name="tiny",
        )
        t = Transcoder(cfg)
        with torch.no_grad():
            for name, p in t.named_parameters():
                p.copy_(
                    torch.randn(p.shape, generator=generator).abs() * 0.1
                    if name == "threshold"
                    else torch.randn(p.shape, generator=generator)
                )
        transcoders.append(t.eval())
    return transcoders


@pytest.mark.parametrize("activation, skip", [("relu", True), ("jumprelu", False), ("batchtopk", True)])
def test_export_circuit_tracer_round_trip(tmp_path, activation, skip):
    ours = random_transcoders(activation, skip)
    export_circuit_tracer(ours, tmp_path / "set", scan="tiny/set")
    config = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set" and config["scan"] == "tiny/set"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("mlp.hook_in", "hook_mlp_out")
    assert config["transcoders"] == [str((tmp_path / "set" / f"layer_{i}.safetensors").resolve()) for i in range(3)]
    loaded = load_pretrained(tmp_path / "set")
    x = torch.randn(2, 5, 16)
    for a, b in zip(ours, loaded):
        assert (b.cfg.input_site, b.cfg.output_site, b.cfg.skip, b.cfg.model_name, b.cfg.input_space) == (
            a.cfg.input_site,
            a.cfg.output_site,
            a.cfg.skip,
            "tiny",
            "unfolded_ln",
        )
        with torch.no_grad():
            assert torch.equal(a(x), b(x))


def test_export_writes_hub_uris_that_load_from_a_snapshot(tmp_path):
    export_circuit_tracer(random_transcoders("relu", True), tmp_path / "repo", repo_id="org/tiny")
    config = yaml.safe_load((tmp_path / "repo" / "config.yaml").read_text())
    assert config["transcoders"][1] == "hf://org/tiny/layer_1.safetensors"
    assert config["scan"] == "repo"
    assert len(load_pretrained(tmp_path / "repo")) == 3


def test_export_refuses_what_circuit_tracer_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="cannot run TopK"):
        export_circuit_tracer(random_transcoders("topk", True), tmp_path)
    with pytest.raises(ValueError, match="one transcoder for each layer 0..n-1"):
        export_circuit_tracer(random_transcoders("relu", True)[1:], tmp_path)
    folded = random_transcoders("relu", False)
    for t in folded:
        t.cfg.input_space = "folded_ln"
    with pytest.warns(UserWarning, match="circuit-tracer runs models unfolded"):
        export_circuit_tracer(folded, tmp_path / "folded")


# --------------------------------------------------------------------------- our format, Hub


def test_our_format_and_checkpoint_directories(tmp_path):
    ours = random_transcoders("jumprelu", True, n_layers=2)
    for t in ours:
        t.save(tmp_path / f"layer_{t.cfg.layer}")
    single = Transcoder.from_pretrained(tmp_path / "layer_1", dtype=torch.float64)
    assert isinstance(single, Transcoder)
    assert single.cfg.to_dict() == {**ours[1].cfg.to_dict(), "dtype": "float64"}
    assert detect_format(tmp_path) == "tl-transcoders"
    both = Transcoder.from_pretrained(tmp_path)
    x = torch.randn(3, 16)
    for a, b in zip(ours, both):
        assert torch.equal(a(x), b(x))


def test_hub_repository_is_downloaded_then_loaded(monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(SPARSIFY)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    t = Transcoder.from_pretrained("org/skip-transcoders", subfolder="transcoder/layers.1.mlp", revision="v1")
    assert isinstance(t, Transcoder) and t.cfg.layer == 1
    [(repo_id, revision, patterns)] = calls
    assert (repo_id, revision) == ("org/skip-transcoders", "v1")
    assert "transcoder/layers.1.mlp/cfg.json" in patterns
    assert "transcoder/layers.1.mlp/sae.safetensors" in patterns
    assert all(p.startswith("transcoder/layers.1.mlp/") for p in patterns)
    assert len(load_pretrained("org/skip-transcoders", subfolder="transcoder")) == 2
    with pytest.raises(TranscoderFileError, match="no transcoder files under 'missing'"):
        load_pretrained("org/skip-transcoders", subfolder="missing")


def test_local_paths_never_go_to_the_hub():
    with pytest.raises(TranscoderFileError, match="no such directory"):
        load_pretrained("./no/such/dir")
    with pytest.raises(ValueError, match="revision"):
        load_pretrained(SPARSIFY / "sae", revision="main")


# --------------------------------------------------------------------------- bad files


def copy(tmp_path: Path, source: Path) -> Path:
    directory = tmp_path / source.name
    shutil.copytree(source, directory)
    return directory


def test_missing_tensor(tmp_path):
    directory = copy(tmp_path, SPARSIFY / "transcoder" / "layers.0.mlp")
    tensors = load_file(directory / "sae.safetensors")
    del tensors["W_skip"]
    save_file(tensors, directory / "sae.safetensors")
    with pytest.raises(TranscoderFileError, match=r"sae.safetensors: tensors do not match.*missing \['W_skip'\]"):
        load_pretrained(directory)


def test_wrong_shape(tmp_path):
    directory = copy(tmp_path, CIRCUIT_TRACER / "relu")
    tensors = load_file(directory / "layer_2.safetensors")
    tensors["W_dec"] = tensors["W_dec"][:, :8].contiguous()
    save_file(tensors, directory / "layer_2.safetensors")
    with pytest.raises(TranscoderFileError, match=r"layer_2.safetensors: tensor W_dec has shape \(64, 8\)"):
        load_pretrained(directory)


def test_truncated_safetensors(tmp_path):
    directory = copy(tmp_path, SAELENS / "transcoder")
    weights = directory / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(TranscoderFileError, match="sae_weights.safetensors: cannot read .* truncated or corrupt"):
        load_pretrained(directory)


def test_unknown_format(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(TranscoderFileError, match="no transcoder files found"):
        load_pretrained(tmp_path)


def test_missing_config(tmp_path):
    directory = copy(tmp_path, SPARSIFY / "sae" / "layers.1")
    (directory / "cfg.json").unlink()
    with pytest.raises(TranscoderFileError, match=r"layers.1/cfg.json: no such file, but sae.safetensors is there"):
        load_pretrained(directory)


def test_circuit_tracer_config_problems(tmp_path):
    directory = copy(tmp_path, CIRCUIT_TRACER / "relu")
    (directory / "layer_1.safetensors").unlink()
    with pytest.raises(TranscoderFileError, match="layer_1.safetensors: no such file"):
        load_pretrained(directory)
    (directory / "config.yaml").write_text("model_kind: cross_layer_transcoder\n")
    with pytest.raises(TranscoderFileError, match="cross-layer transcoder holds W_enc_0"):
        load_pretrained(directory)
    (directory / "config.yaml").write_text("model_kind: [unclosed\n")
    with pytest.raises(TranscoderFileError, match="config.yaml: not valid YAML"):
        load_pretrained(directory)


# --------------------------------------------------------------------------- splicing


def test_loaded_transcoders_fit_the_models_whose_input_space_they_share(model):
    from tl_transcoders.hooks.sites import input_space_of

    transcoders = load_pretrained(SPARSIFY / "transcoder") + load_pretrained(CIRCUIT_TRACER / "jumprelu_skip")[2:]
    if input_space_of(model, "blocks.0.mlp.hook_in") == "folded_ln":
        with pytest.raises(SpliceError, match="trained in input space 'unfolded_ln'"):
            check_compatible(model, transcoders)
    else:
        check_compatible(model, transcoders)


def test_spliced_sparsify_transcoder_writes_its_output_from_the_captured_input():
    from tl_transcoders import splice
    from tl_transcoders.hooks.sites import capture

    model = build_model("bridge-sandwich")
    transcoder = load_pretrained(SPARSIFY / "transcoder" / "layers.1.mlp")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    with splice(model, [transcoder]):
        cache = capture(model, tokens, ["blocks.1.mlp.hook_in", "blocks.1.mlp.hook_out"])
    with torch.no_grad():
        torch.testing.assert_close(cache["blocks.1.mlp.hook_out"], transcoder(cache["blocks.1.mlp.hook_in"]))
