"""Bad input and impossible requests refused where they enter, with the library's own
error types (each a `TranscodersError`) and a message that says what to do; accepted
single objects where a list is expected give what the list gives."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_PARAMS, build_model, make_transcoder, weights_changed
from test_attribute import prompt
from test_cli import run_cli

from tl_transcoders import compute_ablation_baselines, evaluate_splice
from tl_transcoders.analysis.dashboards import collect_activations
from tl_transcoders.analysis.errors import AnalysisError
from tl_transcoders.app import cli
from tl_transcoders.attribution.attribute import attribute
from tl_transcoders.attribution.errors import AttributionError
from tl_transcoders.attribution.interventions import FeatureEdit, intervene
from tl_transcoders.attribution.steering import generate_steered
from tl_transcoders.attribution.targets import LogitTarget
from tl_transcoders.core.config import ConfigError
from tl_transcoders.core.errors import TranscodersError
from tl_transcoders.core.files import OutputPathError
from tl_transcoders.evaluation import EvaluationError
from tl_transcoders.hooks.sites import SiteError, capture, transcoder_config


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_a_model_computing_nan_is_refused_by_every_consumer(name):
    model = build_model(name)
    transcoder = make_transcoder(model, 1, activation="relu")
    tokens = prompt(model)
    with weights_changed(model.blocks[0], lambda p: p.fill_(float("nan"))):
        refuse_everything(model, transcoder, tokens)


def refuse_everything(model, transcoder, tokens):
    """Every consumer refuses `model` (its first block computes NaN), each by name."""
    with pytest.raises(EvaluationError, match="the model itself produced NaN or inf logits"):
        evaluate_splice(model, [transcoder], tokens[None])
    with pytest.raises(FloatingPointError):  # NonFiniteLogitsError is one too
        compute_ablation_baselines(model, tokens[None], 1)
    with pytest.raises(AttributionError, match="NaN or inf logits"):
        attribute(model, [transcoder], tokens)
    with pytest.raises(AttributionError, match="the model produced NaN or inf logits"):
        intervene(model, [transcoder], tokens, [FeatureEdit(1, 2, 0, value=1.0)])
    with pytest.raises(AttributionError, match="NaN or inf logits"):
        generate_steered(model, [transcoder], tokens, [], max_new_tokens=2)
    with pytest.raises(AnalysisError, match="activations at blocks.1.* hold NaN or inf"):
        collect_activations(model, transcoder, tokens[None])


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_one_transcoder_or_one_edit_counts_as_a_list_of_one(name, without_type_checker):
    model = build_model(name)
    transcoder = make_transcoder(model, 1, activation="relu")
    tokens = prompt(model)
    single, listed = attribute(model, transcoder, tokens), attribute(model, [transcoder], tokens)
    assert torch.equal(single.adjacency, listed.adjacency) and torch.equal(single.features, listed.features)
    edit = FeatureEdit(1, 3, 0, value=2.0)
    one = intervene(model, transcoder, tokens, edit)
    assert torch.equal(one.new_logits, intervene(model, [transcoder], tokens, [edit]).new_logits)
    with pytest.raises(AttributionError, match="a FeatureEdit or a list of them, got int"):
        intervene(model, [transcoder], tokens, 3)
    baselines = compute_ablation_baselines(model, tokens[None], 1)
    assert baselines.per_row.keys() == compute_ablation_baselines(model, tokens[None], [1]).per_row.keys() != set()


def test_an_edit_too_large_for_the_dtype_is_refused(without_type_checker):
    model = build_model(MODEL_PARAMS[0])
    transcoder = make_transcoder(model, 1, activation="relu")
    tokens = prompt(model)
    site = transcoder.cfg.input_site
    latent = int(transcoder.encode(capture(model, tokens[None], [site])[site])[3].argmax())
    with pytest.raises(AttributionError, match="too large for the model's dtype"):
        intervene(model, [transcoder], tokens, [FeatureEdit(1, 3, latent, scale=1e38)])


def test_a_logit_target_the_tokenizer_does_not_know_is_refused():
    model = build_model("bridge-sandwich")  # a word tokenizer: "zzz" is its unknown token
    transcoder = make_transcoder(model, 1, activation="relu")
    tokens = model.to_tokens("w1 w2 w3")[0]
    with pytest.raises(AttributionError, match="'zzz' is not in the tokenizer's vocabulary"):
        attribute(model, [transcoder], tokens, targets=[LogitTarget("zzz")])
    graph = attribute(model, [transcoder], tokens, targets=[LogitTarget("w4")])
    assert graph.logit_tokens.tolist() == model.to_tokens("w4", prepend_bos=False)[0].tolist()


def test_config_helpers_name_the_bad_argument():
    model = build_model(MODEL_PARAMS[0])
    with pytest.raises(ConfigError, match="expansion must be a positive integer"):
        transcoder_config(model, 0, expansion=-2, k=4)
    with pytest.raises(ConfigError, match="exactly one of d_latent= and expansion="):
        transcoder_config(model, 0, k=4)
    with pytest.raises(SiteError, match="layer 7 is out of range: the model has 3 layers"):
        transcoder_config(model, 7, d_latent=8, k=4)
    with pytest.raises(EvaluationError, match="layer 9 is out of range"):
        compute_ablation_baselines(model, prompt(model)[None], [9])


def test_output_paths_that_cannot_be_written_are_refused_by_the_commands(monkeypatch, tmp_path, capsys):
    model = build_model(MODEL_PARAMS[0])
    monkeypatch.setattr(cli, "load_model", lambda name, device=None: model)
    make_transcoder(model, 1, activation="relu").save(tmp_path / "layer_1")
    torch.save(prompt(model), tmp_path / "prompt.pt")
    (tmp_path / "file").write_text("kept")
    argv = ["attribute", "--model", "tiny", "--transcoders", str(tmp_path / "layer_1")]
    argv += ["--tokens", str(tmp_path / "prompt.pt"), "--out", str(tmp_path / "file")]
    status, _, err = run_cli(argv, capsys)
    assert status == 2 and err.startswith("tl-transcoders: error: cannot write") and err.count("\n") == 1
    status, _, err = run_cli(["demo", "--model", "tiny", "--output", str(tmp_path / "file")], capsys)
    assert status == 2 and "it exists and is not a directory" in err and err.count("\n") == 1
    assert (tmp_path / "file").read_text() == "kept"
    assert issubclass(OutputPathError, TranscodersError) and issubclass(OutputPathError, OSError)
