"""The command line: `eval` prints the report as JSON, `demo` runs end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MODEL_PARAMS, attribute_command, build_model, make_transcoder

from tl_transcoders import Transcoder, evaluate_splice
from tl_transcoders.app import cli


def test_eval_prints_the_report(monkeypatch, tmp_path, capsys):
    model = build_model(MODEL_PARAMS[0])
    monkeypatch.setattr(cli, "load_model", lambda name, device=None: model)
    transcoders = [make_transcoder(model, layer, seed=layer) for layer in (0, 1)]
    for t in transcoders:
        t.save(tmp_path / f"layer_{t.cfg.layer}")
    tokens = torch.randint(0, model.cfg.d_vocab, (4, 10), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    cli.main(
        [
            "eval",
            "--model",
            "tiny",
            "--transcoders",
            str(tmp_path / "layer_0"),
            str(tmp_path / "layer_1"),
            "--tokens",
            str(tmp_path / "tokens.pt"),
            "--batch-size",
            "2",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    expected = evaluate_splice(model, transcoders, tokens, batch_size=2).to_dict()  # as --batch-size 2
    assert printed.keys() == expected.keys() and printed["layers"].keys() == {"0", "1"}
    assert printed["ce_all_spliced"] == expected["ce_all_spliced"]
    assert printed["layers"]["1"]["fvu"] == expected["layers"]["1"]["fvu"]


def test_demo_writes_transcoders_report_and_dashboards(tmp_path):
    out = tmp_path / "demo"
    cli.main(["demo", "--model", "tiny", "--output", str(out), "--tokens", "8192", "--expansion", "4", "--k", "8"])
    report = json.loads((out / "report.json").read_text())
    assert set(report["layers"]) == {"2"}  # the middle of the tiny model's 4 layers
    transcoder = Transcoder.load(out / "transcoders" / "layer_2")
    assert transcoder.cfg.skip and transcoder.cfg.layer == 2 and transcoder.cfg.k == 8
    assert report["layers"]["2"]["fvu"] < 1.0, "the fit should beat predicting the mean"
    html = (out / "dashboards.html").read_text()
    assert html.count("<html") == 1 and "</html>" in html
    assert html.count("one of the densest latents") == 2 and "then the 2 densest" in html
    run = json.loads((out / "run.json").read_text())
    assert run["layer"] == 2 and run["tokens"] == 8192


def test_eval_reads_and_packs_text(monkeypatch, tmp_path, capsys):
    model = build_model("bridge-sandwich")  # the Gemma-2 Bridge has a (word-level) tokenizer
    monkeypatch.setattr(cli, "load_model", lambda name, device=None: model)
    make_transcoder(model, 1).save(tmp_path / "layer_1")
    (tmp_path / "text.txt").write_text(" ".join(f"w{i % 40}" for i in range(50)))
    cli.main(
        [
            "eval",
            "--model",
            "tiny",
            "--transcoders",
            str(tmp_path / "layer_1"),
            "--text",
            str(tmp_path / "text.txt"),
            "--seq-len",
            "8",
            "--batch-size",
            "4",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_tokens"] == 7 * 7  # 50 words -> 7 rows of BOS + 7 words, 7 predictions each


def test_train_saves_one_directory_per_layer(monkeypatch, tmp_path, capsys):
    model = build_model("bridge-sandwich")  # has a word-level tokenizer
    monkeypatch.setattr(cli, "load_model", lambda name, device=None: model)
    lines = [json.dumps({"text": " ".join(f"w{(i * 7 + j) % 40}" for j in range(30))}) for i in range(40)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines))
    cli.main(
        [
            "train",
            "--model",
            "tiny",
            "--dataset",
            str(tmp_path / "corpus.jsonl"),
            "--layers",
            "0-1",
            "--k",
            "4",
            "--expansion",
            "2",
            "--batch-size",
            "4",
            "--context-size",
            "16",
            "--max-tokens",
            str(4 * 16 * 5),
            "--no-skip",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert "saved" in capsys.readouterr().out
    for layer in (0, 1):
        transcoder = Transcoder.load(tmp_path / "out" / f"layer_{layer}")
        assert transcoder.cfg.layer == layer and not transcoder.cfg.skip and transcoder.cfg.d_latent == 32


def test_layer_lists():
    assert cli.parse_layers("0-3,8") == [0, 1, 2, 3, 8]
    assert cli.parse_layers("5") == [5]


def run_cli(argv, capsys):
    """Run the command; its exit status (0 when it returns) and what it printed."""
    try:
        cli.main(argv)
        status = 0
    except SystemExit as exit:
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_library_errors_are_one_line_with_status_2(monkeypatch, tmp_path, capsys):
    model = build_model(MODEL_PARAMS[0])
    monkeypatch.setattr(cli, "load_model", lambda name, device=None: model)
    make_transcoder(model, 1).save(tmp_path / "layer_1")
    (tmp_path / "garbage.pt").write_bytes(b"not a tensor file")
    status, out, err = run_cli(
        [
            "eval",
            "--model",
            "tiny",
            "--transcoders",
            str(tmp_path / "layer_1"),
            "--tokens",
            str(tmp_path / "garbage.pt"),
        ],
        capsys,
    )
    assert status == 2 and out == ""
    assert err.startswith("tl-transcoders: error: --tokens ") and "not a file written by torch.save" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_debug_shows_the_traceback(monkeypatch, tmp_path):
    from tl_transcoders.hooks.tokens import TokenError

    model = build_model(MODEL_PARAMS[0])
    monkeypatch.setattr(cli, "load_model", lambda name, device=None: model)
    make_transcoder(model, 1).save(tmp_path / "layer_1")
    torch.save(torch.full((2, 8), 10_000), tmp_path / "tokens.pt")
    with pytest.raises(TokenError, match="must lie in"):
        cli.main(
            [
                "--debug",
                "eval",
                "--model",
                "tiny",
                "--transcoders",
                str(tmp_path / "layer_1"),
                "--tokens",
                str(tmp_path / "tokens.pt"),
            ]
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "./no/such/dir", "--transcoders", "x", "--tokens", "t.pt"], "does not exist"),
        (
            ["eval", "--model", "someone/not-a-model", "--transcoders", "x", "--tokens", "t.pt"],
            "is neither a local path nor a model TransformerLens could load from the Hugging Face Hub",
        ),
        (["train", "--model", "tiny", "--dataset", "d", "--layers", "0", "--lr", "-1"], "lr must be a positive"),
    ],
)
def test_bad_names_and_options_say_what_is_wrong(argv, message, capsys):
    status, _, err = run_cli(argv, capsys)
    assert status == 2 and message in err and err.count("\n") == 1


def test_transcoders_for_eval_may_be_a_directory_of_layers(monkeypatch, tmp_path, capsys):
    model = build_model(MODEL_PARAMS[0])
    monkeypatch.setattr(cli, "load_model", lambda name, device=None: model)
    for layer in (0, 1):
        make_transcoder(model, layer, seed=layer).save(tmp_path / "run" / f"layer_{layer}")
    torch.save(torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0)), tmp_path / "tokens.pt")
    status, out, _ = run_cli(
        ["eval", "--model", "tiny", "--transcoders", str(tmp_path / "run"), "--tokens", str(tmp_path / "tokens.pt")],
        capsys,
    )
    assert status == 0 and set(json.loads(out)["layers"]) == {"0", "1"}


def test_train_options_have_the_config_fields_documentation():
    text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "Adam learning rate" in " ".join(text.split()) and "--overwrite" in text


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_attribute_writes_the_graph_its_pruned_form_and_circuit_tracers_files(name, monkeypatch, tmp_path, capsys):
    from tl_transcoders.attribution.attribute import attribute
    from tl_transcoders.attribution.graph import Graph
    from tl_transcoders.attribution.targets import LogitDifference

    model = build_model(name)
    monkeypatch.setattr(cli, "load_model", lambda name, device=None: model)
    out = tmp_path / "graph"
    transcoders, base, tokens = attribute_command(model, tmp_path, out)
    cli.main(base + ["--logit-diff", "#5", "#7", "--max-feature-nodes", "6"])
    summary = json.loads(capsys.readouterr().out)
    expected = attribute(model, transcoders, tokens, max_feature_nodes=6, targets=[LogitDifference(5, 7)])
    graph = Graph.load(out / "graph.safetensors")
    assert torch.equal(graph.adjacency, expected.adjacency) and torch.equal(graph.features, expected.features)
    assert summary["features"] == 6 and len(summary["targets"]) == 1 and "- " in summary["targets"][0]
    assert Graph.load(out / "pruned.safetensors").n_features == summary["pruned_features"] <= 6
    files = json.loads((out / "graph-files" / "graph-metadata.json").read_text())
    assert [g["slug"] for g in files["graphs"]] == ["graph"] and (out / "graph-files" / "graph.json").is_file()
    with pytest.raises(SystemExit) as stop:
        cli.main(base + ["--logit-diff", "#5", "#5"])
    assert stop.value.code == 2 and "the two tokens are the same" in capsys.readouterr().err
