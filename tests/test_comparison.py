"""The seed comparison: three variants from one forward pass, measured alike."""

from __future__ import annotations

import pytest
import torch

from tl_transcoders import evaluate_splice
from tl_transcoders.analysis.comparison import (
    VARIANTS,
    compare_variants,
    density_histogram,
    density_table,
    latent_frequencies,
    markdown_table,
    plot_comparison,
    train_variants,
)
from tl_transcoders.hooks.models import tiny_random_model
from tl_transcoders.hooks.sites import capture


@pytest.fixture(scope="module")
def model():
    return tiny_random_model()


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    generator = torch.Generator().manual_seed(0)
    batches = (torch.randint(0, model.cfg.d_vocab, (8, 32), generator=generator) for _ in range(100))
    out = tmp_path_factory.mktemp("comparison")
    return train_variants(
        model, [1, 2], batches, out, k=8, expansion=4, batch_size=8, context_size=32, max_tokens=8 * 32 * 20
    )


def test_three_variants_share_the_output_site(trained):
    assert list(trained) == list(VARIANTS)
    for layer_index in range(2):
        sae, transcoder, skip = (trained[v][layer_index] for v in VARIANTS)
        assert sae.cfg.input_site == sae.cfg.output_site == transcoder.cfg.output_site == skip.cfg.output_site
        assert transcoder.cfg.input_site == skip.cfg.input_site != sae.cfg.input_site
        assert skip.cfg.skip and not transcoder.cfg.skip and not sae.cfg.skip
        assert sae.cfg.d_latent == transcoder.cfg.d_latent == skip.cfg.d_latent


def test_rows_match_single_evaluations(model, trained):
    tokens = torch.randint(0, model.cfg.d_vocab, (6, 32), generator=torch.Generator().manual_seed(1))
    rows = compare_variants(model, trained, tokens, batch_size=4)  # batches of 4 and 2 rows
    assert len(rows) == 6
    for row in rows:
        transcoder = next(t for t in trained[row["variant"]] if t.cfg.layer == row["layer"])
        alone = evaluate_splice(model, [transcoder], tokens).layers[row["layer"]]  # one batch
        assert row["ce_spliced"] == pytest.approx(alone.ce_spliced, rel=1e-5)
        assert row["fvu"] == pytest.approx(alone.fvu, rel=1e-5)
        assert row["dead_fraction"] == pytest.approx(sum(f == 0 for f in row["frequencies"]) / len(row["frequencies"]))
    table = markdown_table(rows)
    assert table.count("\n") == 1 + 6 and "skip_transcoder" in table


def test_latent_frequencies_match_a_direct_count(model, trained):
    transcoder = trained["transcoder"][0]
    tokens = torch.randint(0, model.cfg.d_vocab, (5, 16), generator=torch.Generator().manual_seed(2))
    x = capture(model, tokens, [transcoder.cfg.input_site])[transcoder.cfg.input_site].reshape(5, 16, -1)
    with torch.no_grad():
        expected = (transcoder.encode(x[:, 1:]) > 0).float().mean((0, 1))
    assert torch.allclose(latent_frequencies(model, transcoder, tokens, batch_size=2), expected)


def test_plot_has_every_variant(model, trained):
    pytest.importorskip("plotly")
    tokens = torch.randint(0, model.cfg.d_vocab, (4, 32), generator=torch.Generator().manual_seed(3))
    figure = plot_comparison(compare_variants(model, trained, tokens))
    assert {trace.name for trace in figure.data} == set(VARIANTS)


def test_bad_options(model, tmp_path):
    with pytest.raises(ValueError, match="unknown variants"):
        train_variants(model, [1], iter([]), tmp_path, variants=["crosscoder"])
    with pytest.raises(ValueError, match="set per variant"):
        train_variants(model, [1], iter([]), tmp_path, skip=True)


def test_density_histogram_and_table():
    rows = [{"variant": "sae", "layer": 2, "frequencies": [0.0, 0.0, 1e-7, 2e-4, 3e-4, 0.05, 0.5, 1.0]}]
    histogram = density_histogram(rows, bins_per_decade=2, lowest=-4)
    assert histogram["edges"] == [-4, -3.5, -3, -2.5, -2, -1.5, -1, -0.5, 0]
    # 1e-7 clamps into the first bin; log10 2e-4 = -3.7 and 3e-4 = -3.52: bin 0; 0.05: bin 5; 0.5 and 1.0: the last
    assert histogram["rows"] == [{"variant": "sae", "layer": 2, "dead": 2, "counts": [3, 0, 0, 0, 0, 1, 0, 2]}]
    table = density_table(rows)
    assert "| variant | layer | dead | < 1e-4 | 1e-4 to 1e-3 | 1e-3 to 1e-2 | 1e-2 to 1e-1 | >= 1e-1 |" in table
    assert "| sae | 2 | 0.250 | 0.125 | 0.250 | 0.000 | 0.125 | 0.250 |" in table


def test_example_script_on_the_tiny_model(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "seed_comparison.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as when the script runs: its folder on the path
    spec = importlib.util.spec_from_file_location("seed_comparison", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    options = [
        "--checkpoint-every",
        "2",
        "--model",
        "tiny",
        "--layers",
        "1",
        "2",
        "--tokens",
        str(8 * 32 * 6),
        "--batch-size",
        "8",
        "--context",
        "32",
        "--heldout-rows",
        "6",
        "--k",
        "4",
        "--expansion",
        "2",
        "--output",
        str(tmp_path / "run"),
    ]
    out = script.main(options)
    import json

    results = json.loads((out / "results.json").read_text())
    assert {(r["variant"], r["layer"]) for r in results["rows"]} == {(v, layer) for v in VARIANTS for layer in (1, 2)}
    assert "| skip_transcoder | 2 |" in (out / "results.md").read_text()
    for variant in VARIANTS:
        assert (out / f"dashboards_{variant}.html").is_file()
        assert (out / "dictionaries" / variant / "layer_2").is_dir()
        assert not list((out / "dictionaries" / variant).glob("checkpoint*"))  # removed once training ended
    ratio = results["evidence"]["reconstruction"]["skip_transcoder vs transcoder"]["2"]["fvu_ratio"]
    rows = {(r["variant"], r["layer"]): r for r in results["rows"]}
    assert ratio == pytest.approx(rows["skip_transcoder", 2]["fvu"] / rows["transcoder", 2]["fvu"])
    assert results["run"]["train_s"] > 0 and "## Evidence for the claims" in (out / "results.md").read_text()

    # --reuse measures the saved dictionaries again, without training: the same numbers
    again = json.loads((script.main(options + ["--reuse"]) / "results.json").read_text())
    assert again["rows"] == results["rows"] and again["run"]["train_s"] == results["run"]["train_s"]
    with pytest.raises(SystemExit, match="other options"):
        script.main(options[:-4] + ["--k", "5"] + options[-4:] + ["--reuse"])
    with pytest.raises(SystemExit, match="missing"):
        script.main(options[:-1] + [str(tmp_path / "empty"), "--reuse"])
