"""Transcoder: activations, sparse forms, save/load and the checks on saved files."""

from __future__ import annotations

import json

import jaxtyping
import pytest
import torch
from safetensors.torch import load_file, save_file

from tl_transcoders import ConfigError, Transcoder, TranscoderConfig, TranscoderFileError, activations
from tl_transcoders.core.errors import TensorDtypeError, TensorInputError

ALL = ["topk", "batchtopk", "relu", "jumprelu"]


def random_transcoder(activation: str, skip: bool = True, d_in: int = 12, d_out: int = 10) -> Transcoder:
    torch.manual_seed(0)
    cfg = TranscoderConfig(d_in=d_in, d_out=d_out, d_latent=40, layer=2, activation=activation, k=5, skip=skip)
    transcoder = Transcoder(cfg)
    with torch.no_grad():
        transcoder.b_enc.normal_(0, 0.3)
        transcoder.b_dec.normal_()
        if skip:
            transcoder.W_skip.normal_()
        if hasattr(transcoder, "threshold"):
            transcoder.threshold.uniform_(0.0, 0.3)
    return transcoder.eval()


@pytest.mark.parametrize("activation", ALL)
def test_sparse_form_matches_dense(activation):
    transcoder = random_transcoder(activation)
    x = torch.randn(4, 7, 12)
    dense = transcoder.encode(x)
    sparse = transcoder.encode_sparse(x)
    assert dense.shape == (4, 7, 40)
    assert torch.equal(sparse.to_dense(40), dense)
    assert torch.allclose(transcoder.decode_sparse(sparse), transcoder.decode(dense), atol=1e-5)
    out, latents = transcoder.forward_with_latents(x)
    assert torch.allclose(out, transcoder(x), atol=1e-5)
    assert torch.allclose(transcoder(x), transcoder.decode(dense) + x @ transcoder.W_skip.T, atol=1e-5)


def test_topk_keeps_exactly_k_largest():
    transcoder = random_transcoder("topk")
    x = torch.randn(50, 12)
    pre = transcoder.pre_activations(x)
    dense = transcoder.encode(x)
    assert ((dense > 0).sum(-1) <= 5).all()
    kth = pre.topk(5, dim=-1).values[:, -1:]
    assert ((dense > 0) <= (pre >= kth)).all()
    torch.testing.assert_close(dense[dense > 0], pre[dense > 0])  # the kernel's sums, in another order


def test_batchtopk_shares_k_per_token_in_training_and_thresholds_in_eval():
    transcoder = random_transcoder("batchtopk").train()
    x = torch.randn(30, 12)
    latents = transcoder.encode(x)
    assert (latents > 0).sum().item() == 5 * 30
    per_token = (latents > 0).sum(-1)
    assert per_token.min() != per_token.max(), "batch top-k should not give every token k"
    transcoder.eval()
    assert torch.equal(
        transcoder.encode(x),
        torch.where(transcoder.pre_activations(x) > transcoder.threshold, transcoder.pre_activations(x), 0.0),
    )


def test_jumprelu_zeroes_below_threshold():
    transcoder = random_transcoder("jumprelu")
    x = torch.randn(20, 12)
    pre, latents = transcoder.pre_activations(x), transcoder.encode(x)
    above = pre > transcoder.threshold
    assert torch.equal(latents[above], pre[above]) and (latents[~above] == 0).all()


def test_sae_is_the_same_class():
    cfg = TranscoderConfig(
        d_in=8,
        d_out=8,
        d_latent=16,
        layer=0,
        k=2,
        input_site="blocks.0.hook_mlp_out",
        output_site="blocks.0.hook_mlp_out",
    )
    assert cfg.is_sae and Transcoder(cfg)(torch.randn(3, 8)).shape == (3, 8)


def test_public_methods_are_shape_checked():
    """The suite runs jaxtyping's beartype checker on the package (pyproject addopts)."""
    transcoder = random_transcoder("topk", d_in=12, d_out=10)
    with pytest.raises(jaxtyping.TypeCheckError):  # integer ids are not activations
        transcoder.encode(torch.randint(0, 5, (3, 12)))
    with pytest.raises(jaxtyping.TypeCheckError):  # one threshold per latent
        activations.jumprelu(torch.randn(3, 40), torch.rand(41))


@pytest.mark.parametrize("activation", ALL)
def test_activations_that_do_not_fit_are_refused_by_name(activation, without_type_checker):
    """Without the test suite's type checker, as a user runs it: the library's own checks."""
    transcoder = random_transcoder(activation, d_in=12, d_out=10)
    for call in (transcoder, transcoder.encode, transcoder.encode_sparse):
        with pytest.raises(TensorInputError, match=r"\[..., d_in=12\].*got shape \[3, 13\]"):
            call(torch.randn(3, 13))
        with pytest.raises(TensorInputError, match=r"got shape \[\]"):
            call(torch.tensor(1.0))
        with pytest.raises(TensorDtypeError, match="must share a dtype.*cast"):
            call(torch.randn(3, 12, dtype=torch.float64))
    assert isinstance(TensorDtypeError("x"), TypeError)  # what the kernels raised before


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: setattr(t.cfg, "k", 1000), r"changed after the module was built \(k\).*k"),
        (lambda t: setattr(t.cfg, "skip", False), r"changed after the module was built \(skip\).*W_skip"),
        (lambda t: setattr(t.cfg, "activation", "nope"), r"changed after the module was built \(activation\)"),
        (lambda t: setattr(t, "W_skip", torch.nn.Parameter(torch.zeros(10, 11))), r"\(a parameter\).*W_skip"),
    ],
)
def test_a_module_changed_after_construction_is_refused_when_run(change, message, without_type_checker):
    transcoder = random_transcoder("topk")
    x = torch.randn(3, 12)
    before = transcoder(x)
    change(transcoder)
    for call in (transcoder, transcoder.encode, transcoder.encode_sparse):
        with pytest.raises(ConfigError, match=message):
            call(x)
    assert torch.equal(random_transcoder("topk")(x), before)  # an unchanged module runs as before


@pytest.mark.parametrize("activation", ALL)
@pytest.mark.parametrize("skip", [True, False])
def test_save_load_round_trip(tmp_path, activation, skip):
    transcoder = random_transcoder(activation, skip=skip)
    transcoder.save(tmp_path / "tc")
    loaded = Transcoder.load(tmp_path / "tc").eval()
    assert loaded.cfg == transcoder.cfg
    x = torch.randn(6, 12)
    assert torch.equal(loaded(x), transcoder(x))
    assert sorted(p.name for p in (tmp_path / "tc").iterdir()) == ["config.json", "transcoder.safetensors"]


def test_load_with_dtype(tmp_path):
    random_transcoder("topk").save(tmp_path)
    loaded = Transcoder.load(tmp_path, dtype=torch.float64)
    assert loaded.W_enc.dtype == torch.float64 and loaded.cfg.dtype == "float64"


# --- bad files -----------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    random_transcoder("jumprelu").save(tmp_path)
    return tmp_path


def edit_header(path, change):
    header = json.loads((path / "config.json").read_text())
    change(header)
    (path / "config.json").write_text(json.dumps(header))


def test_missing_directory(tmp_path):
    with pytest.raises(TranscoderFileError, match="no such file.*Transcoder.save"):
        Transcoder.load(tmp_path / "nothing")


def test_corrupt_json(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(TranscoderFileError, match="config.json: not valid JSON"):
        Transcoder.load(saved)


def test_unknown_format(saved):
    edit_header(saved, lambda h: h.update(format="something-else"))
    with pytest.raises(TranscoderFileError, match="not a tl-transcoders config"):
        Transcoder.load(saved)


def test_unknown_version(saved):
    edit_header(saved, lambda h: h.update(format_version=99))
    with pytest.raises(TranscoderFileError, match="format_version 99 is not supported.*Upgrade"):
        Transcoder.load(saved)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(activation="gelu"), "activation must be one of"),
        (lambda c: c.update(activation="topk", k=500), "k=500 is larger than d_latent=40"),
        (lambda c: c.update(d_in="12"), "d_in must be a positive integer"),
        (lambda c: c.update(colour="blue"), r"unknown config field\(s\) \['colour'\]"),
        (lambda c: c.pop("d_latent"), r"missing required field\(s\) \['d_latent'\]"),
        (lambda c: c.update(input_space="sideways"), "input_space must be one of"),
    ],
)
def test_bad_config_field(saved, change, message):
    edit_header(saved, lambda h: change(h["config"]))
    with pytest.raises(TranscoderFileError, match=message):
        Transcoder.load(saved)


def test_config_does_not_match_weights(saved):
    edit_header(saved, lambda h: h["config"].update(d_latent=41))
    with pytest.raises(TranscoderFileError, match=r"tensor W_enc has shape \(40, 12\), the config requires \(41, 12\)"):
        Transcoder.load(saved)


def test_missing_tensor(saved):
    tensors = load_file(saved / "transcoder.safetensors")
    del tensors["threshold"]
    save_file(tensors, saved / "transcoder.safetensors")
    with pytest.raises(TranscoderFileError, match=r"missing \['threshold'\]"):
        Transcoder.load(saved)


def test_truncated_weights(saved):
    data = (saved / "transcoder.safetensors").read_bytes()
    (saved / "transcoder.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TranscoderFileError, match="transcoder.safetensors: cannot read.*truncated"):
        Transcoder.load(saved)


def test_nan_weights(saved):
    tensors = load_file(saved / "transcoder.safetensors")
    tensors["W_dec"][3, 2] = float("nan")
    save_file(tensors, saved / "transcoder.safetensors")
    with pytest.raises(TranscoderFileError, match="W_dec holds NaN"):
        Transcoder.load(saved)


def test_save_leaves_no_temporary_files(tmp_path):
    random_transcoder("topk").save(tmp_path)
    random_transcoder("topk").save(tmp_path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "transcoder.safetensors"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_in=0), "d_in must be a positive integer"),
        (dict(activation="topk", k=None), "needs k"),
        (dict(skip=True, input_site="a", output_site="a"), "cannot have a skip term"),
        (dict(layer=-1), "layer must be a non-negative integer"),
        (dict(dtype="int8"), "dtype must be one of"),
    ],
)
def test_config_validation(kwargs, message):
    fields = dict(d_in=4, d_out=4, d_latent=8, layer=0, k=2)
    fields.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        TranscoderConfig.from_dict(fields)


def test_config_default_sites():
    cfg = TranscoderConfig(d_in=4, d_out=4, d_latent=8, layer=5, k=2)
    assert (cfg.input_site, cfg.output_site) == ("blocks.5.mlp.hook_in", "blocks.5.hook_mlp_out")
    assert TranscoderConfig.from_dict(cfg.to_dict()) == cfg
