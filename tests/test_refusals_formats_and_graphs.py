"""Bad input refused by name in cross-layer transcoders, other libraries' formats,
devices, graphs, virtual weights, paths, QK attribution, checkpoints, corpora and
ablation baselines; and the exports that would replace a user's files."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MODEL_PARAMS, build_model, make_clt, make_transcoder, weights_changed
from test_attribute import prompt
from test_graph import random_graph

from tl_transcoders import (
    CrossLayerConfig,
    CrossLayerTranscoder,
    SpliceError,
    Transcoder,
    TranscoderFileError,
    compute_ablation_baselines,
    evaluate_splice,
    export_circuit_tracer,
    load_pretrained,
    splice,
)
from tl_transcoders.attribution.errors import AttributionError
from tl_transcoders.attribution.export import export_graph, graph_json
from tl_transcoders.attribution.graph import Graph
from tl_transcoders.attribution.paths import Node, find_paths, path_contribution, run_prompt
from tl_transcoders.attribution.prune import prune
from tl_transcoders.attribution.qk import attribute_qk
from tl_transcoders.attribution.virtual_weights import CrossLayerFeatures, Head, embedding_weights, feature_weights
from tl_transcoders.core.config import ConfigError
from tl_transcoders.core.devices import DeviceError
from tl_transcoders.core.files import OutputPathError
from tl_transcoders.evaluation import EvaluationError
from tl_transcoders.evaluation.baselines import BaselineError
from tl_transcoders.io.data import DataError, token_batches
from tl_transcoders.io.loading import load_directory
from tl_transcoders.training import TrainConfig, Trainer, TrainingError

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.usefixtures("without_type_checker")  # the library's own checks, as a user meets them


def test_two_modules_replacing_one_mlp_are_refused_by_splice():
    model = build_model(MODEL_PARAMS[0])
    clt = make_clt(model, layers=[0, 1, 2], activation="relu")
    transcoder = make_transcoder(model, 1, output_site="blocks.1.mlp.hook_out")
    with pytest.raises(SpliceError, match="both replace the MLP output of the same layer 1"):
        with splice(model, [clt, transcoder]):
            pass


def test_devices_are_checked_before_anything_is_read(tmp_path):
    transcoder = make_transcoder(build_model(MODEL_PARAMS[0]), 0)
    transcoder.save(tmp_path / "t")
    with pytest.raises(DeviceError, match="'gpu0' is not a device torch knows"):
        Transcoder.load(tmp_path / "t", device="gpu0")
    if not torch.cuda.is_available():
        for load in (Transcoder.load, load_pretrained, load_directory):
            with pytest.raises(DeviceError, match="not available on this machine.*device='cpu'"):
                load(tmp_path / "t", device="cuda")
        with pytest.raises(DeviceError, match="not available"):
            Graph.load(tmp_path / "missing.safetensors", device="cuda")
    assert Transcoder.load(tmp_path / "t", device="cpu").W_enc.device.type == "cpu"


def test_cross_layer_indices_are_checked():
    clt = make_clt(build_model(MODEL_PARAMS[0]), layers=[0, 1, 2])
    x = torch.randn(4, clt.cfg.d_model)
    for index in (5, -1):
        with pytest.raises(ConfigError, match=f"layer index {index} is out of range"):
            clt.encode_layer(index, x)
    encoded = clt.encode_layer(2, x)
    with pytest.raises(ConfigError, match="layer index 7 is out of range"):
        clt.decode_layer(7, encoded)


def relu_transcoders(model):
    return [make_transcoder(model, layer, activation="relu", seed=layer) for layer in range(model.cfg.n_layers)]


def test_circuit_tracer_exports_never_replace_a_users_files(tmp_path):
    model = build_model(MODEL_PARAMS[0])
    transcoders = relu_transcoders(model)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="not a directory"):
        export_circuit_tracer(transcoders, tmp_path / "file")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: settings\n")
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(TranscoderFileError, match=r"holds other files \(config.yaml, notes.txt\)"):
        export_circuit_tracer(transcoders, mine)
    assert (mine / "config.yaml").read_text() == "my: settings\n" and (mine / "notes.txt").read_text() == "keep"
    with pytest.raises(TranscoderFileError, match="no transcoders given"):
        export_circuit_tracer([], tmp_path / "empty")
    broken = copy.deepcopy(transcoders)
    with torch.no_grad():
        broken[1].W_dec[0, 0] = float("nan")
    with pytest.raises(TranscoderFileError, match="NaN or inf; nothing was written"):
        export_circuit_tracer(broken, tmp_path / "nan")
    assert not (tmp_path / "nan").exists() and not (tmp_path / "empty").exists()
    single = export_circuit_tracer(make_transcoder(model, 0, activation="relu"), tmp_path / "one")
    assert len(load_pretrained(single)) == 1


def test_a_smaller_cross_layer_export_replaces_a_bigger_one_whole(tmp_path):
    def clt(n_layers):
        return CrossLayerTranscoder(
            CrossLayerConfig(d_model=12, d_latent=8, n_layers=n_layers, activation="relu", k=None)
        )

    export_circuit_tracer(clt(4), tmp_path / "ct")
    export_circuit_tracer(clt(3), tmp_path / "ct")
    assert load_pretrained(tmp_path / "ct").cfg.n_layers == 3
    assert not (tmp_path / "ct" / "W_enc_3.safetensors").exists()


def test_damaged_clt_training_runs_and_site_templates_are_refused_by_name(tmp_path):
    run = tmp_path / "full"
    shutil.copytree(FIXTURES / "clt_training" / "full", run)
    config = json.loads((run / "config.json").read_text())
    config["hookpoints"] = [0] + config["hookpoints"][1:]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(TranscoderFileError, match="hookpoints must be a list of hookpoint names"):
        load_pretrained(run)
    sparsify = next((FIXTURES / "sparsify").rglob("cfg.json")).parent
    with pytest.raises(TranscoderFileError, match=r"site template 'blocks.\{lyr\}.hook_resid_mid'"):
        load_directory(sparsify, input_site="blocks.{lyr}.hook_resid_mid")
    with pytest.raises(ConfigError, match="site template"):
        TrainConfig(layers=[0], k=4, expansion=2, input_site="blocks.{lyr}.x")


def graph_file(tmp_path, change):
    """A saved random graph with `change(tensors, fields)` applied to its stored form."""
    from safetensors.torch import load_file, save_file

    path = random_graph(seed=1).save(tmp_path / "g.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    tensors, fields = load_file(path), json.loads(header["fields"])
    change(tensors, fields)
    save_file(tensors, path, metadata={**header, "fields": json.dumps(fields)})
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, f: t["features"].__setitem__((0, 2), -5), "feature latents must lie in >= 0"),
        (lambda t, f: t["activations"].__setitem__(0, float("nan")), "activations holds NaN"),
        (lambda t, f: t["logit_probabilities"].__setitem__(0, float("nan")), "logit_probabilities holds NaN"),
        (lambda t, f: f.__setitem__("metadata", [1, 2]), "metadata must be a dict"),
        (lambda t, f: f.__setitem__("metadata", {"targets": [{}]}), r"metadata\['targets'\] must describe each"),
    ],
)
def test_damaged_graph_files_are_refused_when_loaded(tmp_path, change, message):
    with pytest.raises(AttributionError, match=message):
        Graph.load(graph_file(tmp_path, change))


def test_graph_queries_refuse_bad_arguments(tmp_path):
    graph = random_graph(seed=1)
    cyclic = copy.deepcopy(graph)
    cyclic.adjacency[0, graph.logit_node(0)] = cyclic.adjacency[graph.logit_node(0), 0] = 1e-30
    with pytest.raises(AttributionError, match="has a cycle"):
        prune(cyclic)
    for threshold in ("0.5", None, float("nan"), 1.5):
        with pytest.raises(AttributionError, match="node_threshold must be a number in"):
            prune(graph, threshold)
    for slug in (5, "a" * 300, "../up"):
        with pytest.raises(AttributionError, match="must be a file name"):
            export_graph(graph, tmp_path / "files", slug)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "graph-metadata.json").write_text(json.dumps({"graphs": [1, "x"]}))
    with pytest.raises(AttributionError, match="not a graph index"):
        export_graph(graph, tmp_path / "junk", "g")
    assert sorted(p.name for p in (tmp_path / "junk").iterdir()) == ["graph-metadata.json"]  # nothing written first
    with pytest.raises(AttributionError, match="tokenizer must have a decode"):
        graph_json(graph, "s", tokenizer="gpt2")


def test_virtual_weight_queries_refuse_bad_arguments():
    model = build_model(MODEL_PARAMS[0])
    t0, t2 = make_transcoder(model, 0), make_transcoder(model, 2, seed=2)
    clt = make_clt(model, layers=[0, 1])
    with pytest.raises(AttributionError, match="latent indices must be integers"):
        feature_weights(model, t0, t2, source_latents=[3.5])
    with pytest.raises(AttributionError, match="pass CrossLayerFeatures"):
        feature_weights(model, clt, t2)
    with pytest.raises(AttributionError, match="via takes Head"):
        feature_weights(model, t0, t2, via=["blocks.1.attn"])
    with pytest.raises(AttributionError, match="head 0 of layer -1 is not a head of this model"):
        embedding_weights(model, t2, via=[Head(-1, 0)])
    assert feature_weights(model, CrossLayerFeatures(clt, 0), t2, source_latents=[1]).shape == (1, t2.cfg.d_latent)
    from tl_transcoders.attribution.virtual_weights import top_connections, top_upstream

    with pytest.raises(AttributionError, match=r"k must be at least 1 \(an integer\), got 2.5"):
        top_upstream(model, t2, 0, t0, k=2.5)
    with pytest.raises(AttributionError, match="block_size must be at least 1"):
        top_connections(model, t0, t2, block_size=0)


def test_path_queries_refuse_bad_nodes_and_options():
    model = build_model(MODEL_PARAMS[0])
    run = run_prompt(model, [make_transcoder(model, 0), make_transcoder(model, 2, seed=2)], prompt(model))
    with pytest.raises(AttributionError, match="a feature node needs index"):
        Node("feature", 3, 2)
    with pytest.raises(AttributionError, match="a logit node needs index"):
        Node("logit", 6)
    with pytest.raises(AttributionError, match="a error node needs layer"):
        Node("error", 6, -1)
    with pytest.raises(AttributionError, match="node kind must be one of"):
        Node("neuron", 1, 0, 0)
    target = Node("logit", 6, index=3)
    for option in ("n_paths", "beam_width"):
        with pytest.raises(AttributionError, match=f"{option} must be at least 1"):
            find_paths(run, target, **{option: 0})
    with pytest.raises(AttributionError, match="max_edges must be at least 0"):
        find_paths(run, target, max_edges=-1)
    with pytest.raises(AttributionError, match="layer 7 is out of range"):
        path_contribution(run, [Node("error", 6, 7), target])
    with pytest.raises(AttributionError, match="index 9 is out of range"):
        path_contribution(run, [Node("embedding", 2), Node("head", 2, 1, 9), target])


def test_qk_attribution_takes_numpy_integers_and_refuses_bad_queries():
    model = build_model(MODEL_PARAMS[0])
    transcoders = [make_transcoder(model, 0, activation="relu")]
    tokens = prompt(model)
    plain = attribute_qk(model, transcoders, tokens, 1, 0, 5, 2)
    numpy = attribute_qk(model, transcoders, tokens, np.int64(1), np.int64(0), torch.tensor(5), 2)
    assert torch.equal(plain.pairs(), numpy.pairs())
    with pytest.raises(AttributionError, match="layer must be an integer"):
        attribute_qk(model, transcoders, tokens, 1.0, 0, 5, 2)
    with pytest.raises(AttributionError, match="n must be at least 1"):
        plain.top_pairs(-1)
    n_nodes = plain.pairs().shape[0]
    for node in (-1, n_nodes):
        with pytest.raises(AttributionError, match=f"node {node} is out of range"):
            plain.describe(node)


def train_config(tmp_path, **fields):
    options = dict(layers=[0], k=4, expansion=2, batch_size=4, context_size=8, max_tokens=128, output_dir=str(tmp_path))
    return TrainConfig(**{**options, "checkpoint_every": 1, **fields})


def batches(model, n=8):
    return [torch.randint(0, model.cfg.d_vocab, (4, 8), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def test_damaged_checkpoints_fall_back_or_are_refused_by_name(tmp_path):
    model = build_model(MODEL_PARAMS[0])
    Trainer(model, train_config(tmp_path, max_tokens=4 * 8 * 2)).fit(batches(model))
    torch.save({"step": 3}, tmp_path / "checkpoint.pt")  # the previous one is whole
    with pytest.warns(UserWarning, match="not a whole training checkpoint.*resuming from the previous"):
        Trainer(model, train_config(tmp_path, max_tokens=4 * 8 * 2, resume=True)).fit(batches(model))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    state["transcoders"] = {}
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(TrainingError, match="does not hold this run's transcoders"):
        Trainer(model, train_config(tmp_path, max_tokens=4 * 8 * 2, resume=True)).fit(batches(model))


def test_evaluation_during_training_needs_both_eval_every_and_eval_tokens(tmp_path):
    model = build_model(MODEL_PARAMS[0])
    tokens = batches(model, 1)[0]
    with pytest.raises(TrainingError, match="needs both eval_every > 0 and eval_tokens.*eval_every=1"):
        Trainer(model, train_config(tmp_path / "a", eval_every=1)).fit(batches(model))
    with pytest.raises(TrainingError, match="eval_every=0 and eval_tokens given"):
        Trainer(model, train_config(tmp_path / "b")).fit(batches(model), eval_tokens=tokens)


def test_corpora_with_bad_values_are_refused_by_name():
    from conftest import word_tokenizer
    from datasets import Dataset

    tokenizer = word_tokenizer()
    with_none = Dataset.from_dict({"text": ["w1 w2", None, "w4"] * 20})
    with pytest.raises(DataError, match="should hold strings, found a NoneType"):
        next(iter(token_batches(with_none, tokenizer, 4, 2)))
    nested = Dataset.from_dict({"input_ids": [["a", "b"]] * 20})
    with pytest.raises(DataError, match="one list of integer token ids per document"):
        next(iter(token_batches(nested, None, 4, 2, bos_token_id=None, separator_token_id=None)))
    ids = Dataset.from_dict({"input_ids": [[1, 2, 3]] * 20})
    with pytest.raises(DataError, match=r"context_size must be at least 2 \(an integer\), got 8.5"):
        next(iter(token_batches(ids, None, 8.5, 2, bos_token_id=None, separator_token_id=None)))
    with pytest.raises(DataError, match=r"batch_size must be at least 1 \(an integer\), got 2.5"):
        next(iter(token_batches(ids, None, 4, 2.5, bos_token_id=None, separator_token_id=None)))
    with pytest.raises(DataError, match="bos_token_id must be a token id"):
        next(iter(token_batches(ids, None, 4, 2, bos_token_id="<bos>", separator_token_id=None)))


def test_ablation_baselines_of_another_model_are_refused():
    model = build_model(MODEL_PARAMS[0])
    transcoder = make_transcoder(model, 0)
    tokens = batches(model, 1)[0]
    with weights_changed(model.blocks[1], lambda p: p.mul_(1.5)):
        other_weights = compute_ablation_baselines(model, tokens, [0])
    with pytest.raises(BaselineError, match="computed with another model or other weights"):
        evaluate_splice(model, [transcoder], tokens, other_weights)
    with pytest.raises(EvaluationError, match="baselines must come from compute_ablation_baselines"):
        evaluate_splice(model, [transcoder], tokens, {"blocks.0.hook_mlp_out": 1.0})
    own = compute_ablation_baselines(model, tokens, [0], batch_size=1)
    report = evaluate_splice(model, [transcoder], tokens, own, batch_size=3)  # other batching: round-off only
    assert report.layers[0].ce_recovered == pytest.approx(
        evaluate_splice(model, [transcoder], tokens).layers[0].ce_recovered, rel=1e-4
    )


def test_attribute_checks_its_output_options_before_attributing(monkeypatch, tmp_path, capsys):
    from test_cli import run_cli

    from tl_transcoders.app import cli

    def no_model(name, device=None):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cli, "load_model", no_model)
    base = ["attribute", "--model", "tiny", "--transcoders", "t", "--prompt", "w1", "--out", str(tmp_path / "o")]
    for extra, message in (
        (["--node-threshold", "1.5"], "node_threshold must be a number"),
        (["--slug", "../x"], "slug"),
    ):
        status, _, err = run_cli(base + extra, capsys)
        assert status == 2 and message in err and err.count("\n") == 1
