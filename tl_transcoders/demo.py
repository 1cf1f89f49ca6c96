"""`tl-transcoders demo`: an end-to-end run on an embedded default, no download.

Builds a tiny random LLaMA-shaped model, fits a skip transcoder to every layer's MLP
from activations of a short token stream (a brief Adam fit, not the full trainer),
splices them in, prints the CE table on held-out tokens, and writes the transcoders
and the report to one output directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from tl_transcoders.config import TranscoderConfig
from tl_transcoders.evaluation import SpliceReport, evaluate_splice
from tl_transcoders.models import tiny_random_model
from tl_transcoders.sites import capture
from tl_transcoders.transcoder import Transcoder


def fit(transcoder: Transcoder, x: Tensor, y: Tensor, steps: int, lr: float = 3e-3) -> float:
    """Fit `transcoder` to map `x` to `y` with Adam on random minibatches; returns the
    final FVU on all of `x`. The decoder starts at zero and the biases at the means
    (b_dec = mean y, b_enc centres x), so the fit starts from FVU 1."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        transcoder.W_dec.zero_()
        transcoder.b_dec.copy_(y.mean(0))
        transcoder.b_enc.copy_(-(x.mean(0) @ transcoder.W_enc.T))
    optimizer = torch.optim.Adam(transcoder.parameters(), lr=lr)
    variance = (y - y.mean(0)).pow(2).sum()
    for _ in range(steps):
        batch = torch.randint(0, x.shape[0], (256,), generator=generator)
        loss = (transcoder(x[batch]) - y[batch]).pow(2).sum() / (y[batch] - y.mean(0)).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return ((transcoder(x) - y).pow(2).sum() / variance).item()


def format_table(report: SpliceReport) -> str:
    """The report as a fixed-width text table."""
    lines = [
        f"clean CE {report.ce_clean:.4f} | all spliced CE {report.ce_all_spliced:.4f}, "
        f"KL {report.kl_all_spliced:.4f} | {report.n_tokens} predicted tokens",
        f"{'layer':>5} {'CE spliced':>10} {'CE zero':>8} {'CE mean':>8} {'CE rec.':>8} "
        f"{'KL':>7} {'FVU':>7} {'L0':>6} {'dead':>6}",
    ]
    for layer, r in sorted(report.layers.items()):
        lines.append(
            f"{layer:>5} {r.ce_spliced:>10.4f} {r.ce_zero_ablated:>8.4f} {r.ce_mean_ablated:>8.4f} "
            f"{r.ce_recovered:>8.3f} {r.kl:>7.4f} {r.fvu:>7.3f} {r.l0:>6.1f} {r.dead_fraction:>6.2f}"
        )
    return "\n".join(lines)


def run_demo(output_dir: str | Path = "demo-output", steps: int = 300) -> Path:
    """Run the demo; returns the output directory."""
    output_dir = Path(output_dir)
    torch.manual_seed(0)
    model = tiny_random_model()
    n_layers, d_vocab = model.cfg.n_layers, model.cfg.d_vocab
    print(f"model: tiny random {type(model).__name__}, {n_layers} layers, d_model {model.cfg.d_model}")
    train_tokens = torch.randint(0, d_vocab, (64, 64))
    heldout_tokens = torch.randint(0, d_vocab, (16, 64))
    transcoders = []
    for layer in tqdm(range(n_layers), desc="fitting skip transcoders"):
        cfg = TranscoderConfig.for_model(model, layer, d_latent=512, k=16, skip=True)
        transcoder = Transcoder(cfg)
        acts = capture(model, train_tokens, [cfg.input_site, cfg.output_site])
        fit(transcoder, acts[cfg.input_site], acts[cfg.output_site], steps)
        transcoder.save(output_dir / f"layer_{layer}")
        transcoders.append(transcoder.eval())
    report = evaluate_splice(model, transcoders, heldout_tokens)
    print(format_table(report))
    (output_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    print(f"wrote {n_layers} transcoders and report.json to {output_dir.resolve()}")
    return output_dir
