"""Regenerate the figures in README and docs (docs/figures/) from real runs.

    seed-comparison.svg    FVU and CE recovered by layer for the SAE, transcoder and skip
                           transcoder of the seed comparison (docs/results/seed-comparison/
                           results.json, written by examples/seed_comparison.py)
    dashboard.png          the first dashboard of that run's skip transcoders
                           (dashboards_skip_transcoder.html), as headless Chromium draws it
    attribution-graph.png  `tl-transcoders serve` showing the attribution graph of a real
                           prompt, its most influential feature selected (needs --graph-dir:
                           the --out directory of `tl-transcoders attribute`)

Needs Chromium (Debian's `chromium`) for the pictures. Run from the repository root:
    .venv-tl3.9.0/bin/python scripts/figures.py [--graph-dir DIR]

The committed attribution-graph.png: SmolLM2-135M (fp32, `benchmarks/setup.sh`) with the 30
per-layer skip transcoders that `benchmarks/clt.py` trains (1,152 latents, k 32, 393,216
tokens, under .bench/cache/train/clt_runs/per_layer), on "The capital of France is":
    tl-transcoders attribute --model .bench/smollm2-fp32 --transcoders <the 30 layer_N folders,
        in layer order> --prompt "The capital of France is" --max-feature-nodes 512 --out DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"
SEED_RESULTS = ROOT / "docs" / "results" / "seed-comparison"
COLOURS = {"sae": "#7f7f7f", "transcoder": "#1f77b4", "skip_transcoder": "#d62728"}


def line_chart(rows: list[dict], metric: str, title: str, x0: int, width: int = 380, height: int = 260) -> str:
    """An SVG group: `metric` by layer, one line per variant, at horizontal offset `x0`."""
    layers = sorted({r["layer"] for r in rows})
    values = [r[metric] for r in rows]
    low, high = min(0.0, min(values)), max(values) * 1.1
    left, top, plot_w, plot_h = x0 + 50, 40, width - 70, height - 90

    def x(layer: int) -> float:
        return left + plot_w * layers.index(layer) / max(len(layers) - 1, 1)

    def y(value: float) -> float:
        return top + plot_h * (1 - (value - low) / (high - low))

    parts = [f'<text x="{x0 + width / 2}" y="22" text-anchor="middle" font-weight="bold">{title}</text>']
    for i in range(5):
        value = low + (high - low) * i / 4
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:.2f}</text>')
    for layer in layers:
        parts.append(f'<text x="{x(layer):.1f}" y="{top + plot_h + 18}" text-anchor="middle">{layer}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 38}" text-anchor="middle">layer</text>')
    for variant, colour in COLOURS.items():
        points = sorted((r["layer"], r[metric]) for r in rows if r["variant"] == variant)
        path = " ".join(f"{x(layer):.1f},{y(value):.1f}" for layer, value in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{x(la):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"/>' for la, v in points]
    return "".join(parts)


def seed_comparison_svg() -> Path:
    results = json.loads((SEED_RESULTS / "results.json").read_text())
    rows, run = results["rows"], results["run"]
    legend = "".join(
        f'<rect x="{60 + 190 * i}" y="292" width="14" height="4" fill="{colour}"/>'
        f'<text x="{80 + 190 * i}" y="298">{variant.replace("_", " ")}</text>'
        for i, (variant, colour) in enumerate(COLOURS.items())
    )
    caption = (
        f"{run['model']}, k={run['k']}, {run['expansion']}x expansion, {run['tokens']:,} training tokens, "
        f"{run['heldout_tokens']:,} held-out tokens"
    )
    svg = (
        '<svg xmlns="http://www.w3.org/2000/svg" width="780" height="330" font-family="sans-serif" font-size="12">'
        '<rect width="780" height="330" fill="white"/>'
        + line_chart(rows, "fvu", "FVU (lower is better)", 0)
        + line_chart(rows, "ce_recovered", "CE recovered (higher is better)", 390)
        + legend
        + f'<text x="390" y="322" text-anchor="middle" fill="#555" font-size="11">{caption}</text></svg>'
    )
    path = FIGURES / "seed-comparison.svg"
    path.write_text(svg + "\n")
    return path


def screenshot(url: str, path: Path, size: str) -> Path:
    """Headless Chromium's picture of `url` at window `size` ("W,H")."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("Chromium is needed for the pictures: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={size}"]
            + [f"--user-data-dir={profile}", f"--screenshot={path}", url],
            check=True,
            capture_output=True,
        )
    return path


def attribution_graph_png(graph_dir: Path) -> Path:
    from tl_transcoders.app.serve import make_server, viewer_data

    graph = viewer_data(graph_dir)["graph"]
    features = [n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
    chosen = max(features, key=lambda n: n["influence"] or 0)["node_id"]
    server = make_server(graph_dir, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/#node={chosen}"
        return screenshot(url, FIGURES / "attribution-graph.png", "1500,900")
    finally:
        server.shutdown()
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph-dir", type=Path, help="the --out directory of `tl-transcoders attribute`")
    args = parser.parse_args()
    FIGURES.mkdir(parents=True, exist_ok=True)
    made = [seed_comparison_svg()]
    made.append(
        screenshot((SEED_RESULTS / "dashboards_skip_transcoder.html").as_uri(), FIGURES / "dashboard.png", "900,700")
    )
    if args.graph_dir is not None:
        made.append(attribution_graph_png(args.graph_dir))
    for path in made:
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
